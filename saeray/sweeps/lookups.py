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
from .heads import ACTIVE_SIGMAS, PAIR_RANGE, ablation_effects_batch, active, head_scores_batch, pairs
from .trim import KEEP, trim_many


@dataclass(frozen=True)
class ItemOptions:
    n_prompts: int = 20          # activating prompts per neuron to explain from (the paper's 20)
    n_test: int = 10             # held-out prompts per neuron to score on (the paper's max_per_nh)
    max_prompt_len: int = 100    # trimmed prompts longer than this are dropped (the paper's rule)
    keep: float = KEEP
    sigmas: float = ACTIVE_SIGMAS
    pair_lo: float = PAIR_RANGE[0]
    pair_hi: float = PAIR_RANGE[1]
    max_pairs: int | None = None  # per neuron, the heads with the largest mean score first (None: all, the paper)
    batch: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def activations_at_last(model, layer: int, neuron: int, seqs: list[list[int]], chunk: int = 32) -> list[float]:
    """The neuron's activation at the last token of each prompt (right-padded batches)."""
    from .heads import padded

    dev = next(model.parameters()).device
    name = f"mlp_post.{layer}"
    out: list[float] = []
    for a in range(0, len(seqs), chunk):
        x, last = padded(seqs[a:a + chunk], dev)
        acts = model(x, capture=[name], logits=False).acts[name]
        out += acts[torch.arange(len(x), device=dev), last, neuron].float().tolist()
    return out


def activation_at_last(model, layer: int, neuron: int):
    """``ids -> activation at the last token``, for one prompt at a time."""
    return lambda ids: activations_at_last(model, layer, neuron, [ids])[0]


def _prompts(model, layer: int, neuron: int, hits, ids: np.ndarray, bos: int | None, opt: "ItemOptions",
             split: str) -> list[dict]:
    """The hits as prompts: cut at the maximal token, trimmed (all of a neuron's binary searches in
    lockstep, one batched forward per step), too long ones dropped."""
    seqs, prefixes = [], []
    for h in hits:
        seq = [int(t) for t in ids[h.context, : h.position + 1]]
        prefix = [seq[0]] if bos is not None and seq and seq[0] == bos else []
        seqs.append(seq[len(prefix):])
        prefixes.append(prefix)
    act_many = lambda ss: activations_at_last(model, layer, neuron, ss)  # noqa: E731
    todo = [k for k, h in enumerate(hits) if h.value > 0 and seqs[k]]
    kept = {k: seqs[k] for k in range(len(hits))}
    for pre in {tuple(prefixes[k]) for k in todo}:      # one lockstep search per prefix (BOS or none)
        ks = [k for k in todo if tuple(prefixes[k]) == pre]
        for k, t in zip(ks, trim_many([seqs[k] for k in ks], act_many, opt.keep, list(pre))):
            kept[k] = t
    out, full = [], []
    for k, h in enumerate(hits):
        if not seqs[k] or len(kept[k]) > opt.max_prompt_len:
            continue
        out.append({"split": split, "context": int(h.context), "position": int(h.position),
                    "activation": float(h.value), "start": len(seqs[k]) - len(kept[k]), "ids": prefixes[k] + kept[k]})
        full.append(out[-1]["ids"])
    for p, v in zip(out, act_many(full) if full else []):
        p["trimmed_activation"] = v
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
        if ps:
            scores = head_scores_batch(model, [p["ids"] for p in ps], layer, i)
            for p, sc in zip(ps, scores):
                a = active(sc, opt.sigmas)
                p["head_scores"] = sc.flatten().tolist()
                p["active"] = a.flatten().tolist()
                masks.append(a)
        ex = [m for p, m in zip(ps, masks) if p["split"] == "explain"]
        chosen = pairs(ex, opt.pair_lo, opt.pair_hi) if ex else []
        n_heads = masks[0].shape[1] if masks else 0
        mean = torch.tensor([p["head_scores"] for p in ps if p["split"] == "explain"]).mean(0) if ex else None
        top_head = divmod(int(mean.argmax()), n_heads) if mean is not None else None
        if opt.max_pairs is not None and len(chosen) > opt.max_pairs:
            # the heads that write most along the neuron's input, on average over its prompts
            chosen = sorted(chosen, key=lambda c: -float(mean[c[0] * n_heads + c[1]]))[:opt.max_pairs]
            chosen = sorted(chosen)
        eff = ablation_effects_batch(model, [p["ids"] for p in ps], n["token_id"], [(l, h) for l, h, _ in chosen]) \
            if ps and chosen else None
        for j, p in enumerate(ps):
            p["effects"] = eff[:, j].tolist() if eff is not None else []
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
