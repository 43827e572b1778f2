"""One context look-up work item (Neo, Cohen, Barez, EMNLP 2024; methods.md §5), a plain function
over a whole-model stage, testable without Ray: for a batch of neurons of one layer, the prompts
that fire each neuron most (cut and trimmed, :mod:`.trim`), every earlier head's attribution on
each prompt and which heads are active (:mod:`.heads`), the (neuron, head) pairs worth explaining,
and the paper's ablation check for every pair on every prompt. The explanations and their scores
are a second step (:mod:`.explain_step`): they need an LLM, not the audited model.

Prompts come from two disjoint sets of corpus contexts: ``explain`` (the top ``n_prompts`` per
neuron, from which pairs are chosen and explained) and ``test`` (the top ``n_test`` per neuron,
held out: the classifier is scored on them).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..models.pool import DirectJob
from .activating import top_activating
from .heads import ACTIVE_SIGMAS, PAIR_RANGE, ablation_effects, active, head_scores, pairs
from .trim import KEEP, trim


@dataclass(frozen=True)
class ItemOptions:
    n_prompts: int = 20          # activating prompts per neuron to explain from (the paper's 20)
    n_test: int = 10             # held-out prompts per neuron to score on (the paper's max_per_nh)
    max_prompt_len: int = 100    # trimmed prompts longer than this are dropped (the paper's rule)
    keep: float = KEEP
    sigmas: float = ACTIVE_SIGMAS
    pair_lo: float = PAIR_RANGE[0]
    pair_hi: float = PAIR_RANGE[1]
    batch: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


def activation_at_last(model, layer: int, neuron: int):
    dev = next(model.parameters()).device
    name = f"mlp_post.{layer}"

    @torch.no_grad()
    def act(ids: list[int]) -> float:
        out = model(torch.tensor([ids], device=dev), capture=[name], logits=False)
        return float(out.acts[name][0, -1, neuron])
    return act


def _prompts(model, layer: int, neuron: int, hits, ids: np.ndarray, bos: int | None, opt: ItemOptions,
             split: str) -> list[dict]:
    act = activation_at_last(model, layer, neuron)
    out = []
    for h in hits:
        seq = [int(t) for t in ids[h.context, : h.position + 1]]
        prefix = [seq[0]] if bos is not None and seq and seq[0] == bos else []
        body = seq[len(prefix):]
        if not body:
            continue
        kept = trim(body, act, opt.keep, prefix) if h.value > 0 else body
        if len(kept) > opt.max_prompt_len:
            continue
        out.append({"split": split, "context": int(h.context), "position": int(h.position),
                    "activation": float(h.value), "start": len(body) - len(kept),
                    "ids": prefix + kept, "trimmed_activation": act(prefix + kept)})
    return out


def select(model, layer: int, which: str, n: int, decode, word_level: bool, seed: int = 0) -> list[dict]:
    """The neurons of one set of one layer, as plain dicts: ``top`` (the paper's whole-word
    next-token neurons), ``random`` (the control) or ``copy`` (storyworld: the top neurons of the
    nonce code words, which only copying can predict)."""
    from .neurons import next_token_neurons, random_neurons

    if which == "top":
        ns = next_token_neurons(model, [layer], decode, n, word_level)
    elif which == "random":
        ns = random_neurons(model, [layer], decode, n, seed=seed + layer)
    elif which == "copy":
        from ..storyworld.vocab import NONCE

        nonce = set(NONCE)
        ns = next_token_neurons(model, [layer], lambda t: decode(t) if decode(t) in nonce else "", n, word_level)
    else:
        raise ValueError(f"unknown neuron set {which!r}")
    return [{"set": which, "index": x.index, "token_id": x.token_id, "token": x.token, "congruence": x.congruence}
            for x in ns]


def run_item(model, layer: int, neurons: list[dict], explain, test, bos: int | None, opt: ItemOptions) -> list[dict]:
    """Everything one item contributes, per neuron (plain numbers and lists, picklable).

    ``neurons``: dicts with ``index`` (and whatever describes them: token, congruence, set);
    ``explain`` / ``test``: (ids [n, T], keep [n, T]) arrays of corpus contexts."""
    keys = [(layer, n["index"]) for n in neurons]
    top_e = top_activating(model, explain[0], explain[1], keys, opt.n_prompts, opt.batch)
    top_t = top_activating(model, test[0], test[1], keys, opt.n_test, opt.batch)
    out = []
    for n in neurons:
        i = n["index"]
        ps = (_prompts(model, layer, i, top_e[(layer, i)], explain[0], bos, opt, "explain")
              + _prompts(model, layer, i, top_t[(layer, i)], test[0], bos, opt, "test"))
        masks = []
        for p in ps:
            s = head_scores(model, p["ids"], layer, i)
            a = active(s, opt.sigmas)
            p["head_scores"] = s.flatten().tolist()
            p["active"] = a.flatten().tolist()
            masks.append(a)
        ex = [m for p, m in zip(ps, masks) if p["split"] == "explain"]
        chosen = pairs(ex, opt.pair_lo, opt.pair_hi) if ex else []
        n_heads = masks[0].shape[1] if masks else 0
        mean = torch.tensor([p["head_scores"] for p in ps if p["split"] == "explain"]).mean(0) if ex else None
        top_head = divmod(int(mean.argmax()), n_heads) if mean is not None else None
        for p in ps:
            p["effects"] = ablation_effects(model, p["ids"], n["token_id"], [(l, h) for l, h, _ in chosen])
        out.append({**n, "layer": layer, "n_heads": n_heads, "prompts": ps,
                    "pairs": [{"head_layer": l, "head": h, "share": s} for l, h, s in chosen],
                    "top_head": top_head})
    return out


class LookupJob(DirectJob):
    """The pool job (direct: it drives the whole-model stage itself). A payload is one item:
    ``{"kind": "neurons", set, layer, batch, ...}`` or ``{"kind": "induction", ...}``."""

    def __init__(self, stage, device: torch.device, ref, word_level: bool):
        if not (stage.is_first and stage.is_last):
            raise ValueError("a look-up sweep needs the whole model in one actor (one pipeline stage)")
        self.model, self.device, self.ref, self.word_level = stage, device, ref, word_level
        self._tok = None

    def decode(self, t: int) -> str:
        if self._tok is None:
            self._tok = self.ref.tokenizer()
        return self._tok.decode([t])

    def _contexts(self, c):
        """The corpus contexts travel as one object-store ref in the payload (an actor's own
        arguments must stay small to be restartable); fetched once per actor."""
        import ray

        if isinstance(c, ray.ObjectRef):
            if getattr(self, "_ctx_key", None) != c.hex():
                self._ctx, self._ctx_key = ray.get(c), c.hex()
            return self._ctx
        return c

    def run(self, payload: dict) -> int:
        if payload["kind"] == "induction":
            from .induction import head_induction

            self.out.append(head_induction(self.model, **payload["args"]))
            return 1
        n_all = payload["n"]
        ns = select(self.model, payload["layer"], payload["set"], n_all, self.decode, self.word_level, payload["seed"])
        a = payload["batch"] * payload["per_item"]
        ns = ns[a:a + payload["per_item"]]
        opt = ItemOptions(**payload["options"])
        c = self._contexts(payload["contexts"])
        self.out.extend(run_item(self.model, payload["layer"], ns, (c["explain_ids"], c["explain_keep"]),
                                 (c["test_ids"], c["test_keep"]), c["bos"], opt))
        return len(self.out)
