"""Next-token neurons (Neo, Cohen, Barez, EMNLP 2024; methods.md §5.2): MLP neurons whose output
weight writes almost directly into one token's logit.

Congruence of neuron i of layer L with token t is ``W_out[L][i] · W_U[:, t]``, read the way the
authors' TransformerLens setup reads it (``fold_ln``, ``center_writing_weights``,
``center_unembed``): the final norm's scale folded into W_U, W_U centred over the vocabulary (a
shift every logit shares changes no prediction), and, for LayerNorm families, W_out centred over
d_model (LayerNorm removes the mean the neuron writes). A neuron's token is its argmax; per layer
the top-N neurons by that maximum are kept, walking down the ranking and skipping neurons whose
token is not a whole word (the paper's filter: a leading space and more than two characters; on a
word-level vocabulary such as storyworld's every alphabetic token of more than two letters is a
word). Random neurons with no filter are the control set.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..models.arch import view


@dataclass(frozen=True)
class Neuron:
    layer: int
    index: int
    token_id: int
    token: str
    congruence: float


def unembed_directions(arch) -> torch.Tensor:
    """W_U [d_model, vocab] with the final norm's scale folded in and centred over the vocabulary."""
    W = arch.W_U.detach().float()
    gamma = getattr(arch.final_norm, "weight", None)
    if gamma is not None:
        W = gamma.detach().float()[:, None] * W
    return W - W.mean(1, keepdim=True)


def congruence(model, layer: int) -> torch.Tensor:
    """[d_mlp, vocab]: every neuron of ``layer`` against every token."""
    arch = view(model)
    W_out = arch.W_out(layer).detach().float()
    if arch.family.name != "llama":          # LayerNorm (not RMSNorm) families: centre writing weights
        W_out = W_out - W_out.mean(1, keepdim=True)
    return W_out @ unembed_directions(arch)


def is_whole_word(text: str, word_level: bool = False) -> bool:
    if word_level:
        return text.isalpha() and len(text) > 2
    return text.startswith(" ") and len(text) > 2 and text.strip().isalpha()


def next_token_neurons(model, layers: list[int], decode, n_per_layer: int = 20, word_level: bool = False,
                       skip: frozenset[str] = frozenset()) -> list[Neuron]:
    """The top ``n_per_layer`` whole-word neurons of each layer, by maximal congruence.
    ``decode(token_id) -> str`` is the tokenizer's text of one token."""
    out = []
    for L in layers:
        c = congruence(model, L)
        best, tok = c.max(1)
        kept = 0
        for i in torch.argsort(best, descending=True, stable=True).tolist():
            text = decode(int(tok[i]))
            if text in skip or not is_whole_word(text, word_level):
                continue
            out.append(Neuron(L, i, int(tok[i]), text, float(best[i])))
            kept += 1
            if kept == n_per_layer:
                break
    return out


def random_neurons(model, layers: list[int], decode, n_per_layer: int = 20, seed: int = 0) -> list[Neuron]:
    """The control set: neurons drawn uniformly, each with its own top token, no filter."""
    rng = random.Random(seed)
    out = []
    for L in layers:
        c = congruence(model, L)
        best, tok = c.max(1)
        for i in sorted(rng.sample(range(c.shape[0]), min(n_per_layer, c.shape[0]))):
            out.append(Neuron(L, i, int(tok[i]), decode(int(tok[i])), float(best[i])))
    return out
