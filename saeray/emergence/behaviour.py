"""Behaviour beside features: when a zoo model can recall a fact or copy from its context.

The storyworld zoo scores every checkpoint it saves on held-out documents (``zoo.json``):
``fact_acc`` (the planted fact's answer predicted) and ``copy_acc`` (the second occurrence of a
code word or guest name predicted). A behaviour is possible from the first checkpoint whose
accuracy stays at or above the threshold. Each behaviour is set beside the concepts that serve it:
fact recall needs the fact relation and the answer slot; copying needs the copy target and its kind.
"""
from __future__ import annotations

from .thresholds import stays_from

BEHAVIOURS = {
    "fact_recall": {"metric": "fact_acc",
                    "concepts": ("next_is_fact_answer", "is_fact_answer", "fact_relation=home", "fact_relation=job",
                                 "fact_relation=pet")},
    "copying": {"metric": "copy_acc",
                "concepts": ("next_is_copy_target", "is_copy_target", "copy_kind=code", "copy_kind=guest")},
}


def zoo_curves(model: str) -> dict[str, dict[int, float]] | None:
    """{behaviour: {step: accuracy}} for a storyworld zoo model, None for any other model."""
    from ..modelref import ZOO_PREFIX

    if not model.startswith(ZOO_PREFIX):
        return None
    from ..storyworld.zoo import build_zoo, config_for, list_zoo

    cfg = config_for(model)
    build_zoo(cfg, progress=False)
    index = list_zoo(cfg)
    ckpts = index["models"][model]["checkpoints"]
    return {b: {int(c["step"]): float(c[d["metric"]]) for c in ckpts} for b, d in BEHAVIOURS.items()}


def behaviour_steps(curves: dict[str, dict[int, float]], steps: list[int], threshold: float) -> dict[str, int | None]:
    """Per behaviour, the first of ``steps`` from which accuracy stays >= threshold (over ``steps``)."""
    out = {}
    for b, curve in curves.items():
        have = [s for s in steps if s in curve]
        out[b] = stays_from(have, [curve[s] >= threshold for s in have])
    return out
