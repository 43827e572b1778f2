"""One latent batch's dashboards, as SAEDashboard writes them (``NeuronpediaDashboardFeature``,
wave2.md §4), from harvested activations and the SAE alone: plain functions, no Ray.

Per latent:

* ``activations``: the top contexts (the best position of each of the most activating documents,
  ``bin_min = -1``, ``bin_contains = -1`` as SAEDashboard marks its top group), then samples from
  lower activation intervals (equal-width intervals of (0, max], highest first, each with the share
  of the latent's firings it holds, SAEDashboard's "INTERVAL a - b / CONTAINS x%"). Each context is
  a window of tokens around the activating one with the latent's value on every token;
* ``freq_hist_data_bar_*``: a histogram of the non-zero activations; ``frac_nonzero``: the share of
  tokens where the latent fired (|a| > 1e-6, SAEDashboard's count);
* ``pos_str/pos_values``, ``neg_str/neg_values``: the logit lens, the decoder direction (in the
  hook point's units) times the unembedding, no final norm (SAEDashboard's convention), top and
  bottom rows; ``logits_hist_data_bar_*``: the histogram of all of them;
* ``neuron_alignment_*``: the three largest entries of the decoder direction (SAEDashboard's
  feature tables have 3 rows); ``l1`` their share of the direction's L1 norm;
* ``saeray``: what SAEDashboard has no field for: the latent's groups in this dashboard, its
  firing count, its nearest latents by decoder cosine, its planted concept and GradSAE influence
  where known, and on storyworld its explanation by the planted labels (:mod:`.explain`). Correlated neurons/features and ``decoder_weights_dist`` are left empty.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FIRED = 1e-6          # SAEDashboard's density threshold
HIST_BINS = 50        # SAEDashboard's histograms
ALIGN_ROWS = 3        # SAEDashboard's feature tables


@dataclass
class Tokens:
    """The harvested rows a dashboard reads: corpus order, one row per kept token."""

    acts: np.ndarray      # [n, d] float16/32
    doc: np.ndarray       # [n] int64
    pos: np.ndarray       # [n] int32
    token: np.ndarray     # [n] int32

    def __len__(self) -> int:
        return len(self.doc)


def _round(v, digits: int = 5) -> list[float]:
    return [round(float(x), digits) for x in np.asarray(v).ravel()]


@torch.no_grad()
def encode(sae, acts: np.ndarray, latents: np.ndarray | None = None, chunk: int = 8192):
    """Non-zero latent values as (row, column, value) arrays; columns index ``latents`` (all when None)."""
    rows, cols, vals = [], [], []
    sel = None if latents is None else torch.as_tensor(latents, dtype=torch.long)
    for i in range(0, len(acts), chunk):
        f = sae.encode(torch.tensor(acts[i:i + chunk], dtype=torch.float32))
        if sel is not None:
            f = f[:, sel]
        r, c = (f.abs() > FIRED).nonzero(as_tuple=True)
        rows.append((r + i).numpy())
        cols.append(c.numpy())
        vals.append(f[r, c].numpy())
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)


def counts(sae, acts: np.ndarray) -> np.ndarray:
    """Firings per latent over ``acts`` (what the "most frequent" group and dead latents come from)."""
    _, c, _ = encode(sae, acts)
    return np.bincount(c, minlength=sae.width)


def _window(t: Tokens, row: int, before: int, after: int) -> tuple[int, int]:
    """[lo, hi) rows around ``row`` within its document."""
    lo, hi = max(0, row - before), min(len(t), row + after + 1)
    d = t.doc[row]
    while t.doc[lo] != d:
        lo += 1
    while t.doc[hi - 1] != d:
        hi -= 1
    return lo, hi


def _context(t: Tokens, row: int, rows_j: np.ndarray, vals_j: np.ndarray, vocab: list[str], before: int,
             after: int, bin_min: float, bin_max: float, bin_contains: float) -> dict:
    lo, hi = _window(t, row, before, after)
    idx = np.searchsorted(rows_j, np.arange(lo, hi))
    idx = np.minimum(idx, len(rows_j) - 1)
    hit = rows_j[idx] == np.arange(lo, hi)
    values = np.where(hit, vals_j[idx], 0.0)
    return {"bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains,
            "tokens": [vocab[i] if 0 <= i < len(vocab) else f"<{i}>" for i in t.token[lo:hi].tolist()],
            "values": _round(values), "qualifying_token_index": int(row - lo),
            "doc": int(t.doc[row]), "pos": int(t.pos[row])}


def contexts(t: Tokens, rows_j: np.ndarray, vals_j: np.ndarray, vocab: list[str], *, top: int, quantiles: int,
             per_quantile: int, before: int, after: int, rng: np.random.Generator) -> list[dict]:
    """The top group then the interval samples of one latent (``rows_j`` sorted ascending)."""
    if not len(rows_j):
        return []
    order = np.argsort(-vals_j, kind="stable")
    docs = t.doc[rows_j[order]]
    _, first = np.unique(docs, return_index=True)       # each document's best position
    best = order[np.sort(first)][:top]
    vmax = float(vals_j[order[0]])
    out = [_context(t, int(rows_j[i]), rows_j, vals_j, vocab, before, after, -1.0, round(vmax, 5), -1.0) for i in best]
    shown = set(t.doc[rows_j[best]].tolist())
    edges = np.linspace(0.0, vmax, quantiles + 1)
    for q in range(quantiles - 1, -1, -1):
        lo_v, hi_v = edges[q], edges[q + 1]
        inside = np.nonzero((vals_j > lo_v) & (vals_j <= hi_v))[0]
        share = len(inside) / len(vals_j)
        pool = [i for i in inside.tolist() if t.doc[rows_j[i]] not in shown]
        if not pool:
            continue
        pick = rng.choice(len(pool), size=min(per_quantile, len(pool)), replace=False)
        for p in sorted(pick.tolist(), key=lambda p: -vals_j[pool[p]]):
            i = pool[p]
            shown.add(int(t.doc[rows_j[i]]))
            out.append(_context(t, int(rows_j[i]), rows_j, vals_j, vocab, before, after, round(float(lo_v), 5),
                                round(float(hi_v), 5), round(share, 5)))
    return out


def histogram(values: np.ndarray, bins: int = HIST_BINS) -> tuple[list[float], list[float]]:
    """(bar centres, heights) of ``values`` (SAEDashboard's ``*_hist_data_bar_values/heights``)."""
    if not len(values):
        return [], []
    h, e = np.histogram(values, bins=bins)
    return _round((e[:-1] + e[1:]) / 2), [float(x) for x in h]


def logit_lens(direction: torch.Tensor, W_U: torch.Tensor | None, vocab: list[str], rows: int) -> dict:
    """Tokens the direction promotes and suppresses through the unembedding [d, vocab] (no final norm)."""
    if W_U is None or W_U.shape[0] != direction.shape[0]:
        return {"pos_str": [], "pos_values": [], "neg_str": [], "neg_values": [],
                "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": []}
    logits = direction.float() @ W_U.float()
    top = torch.topk(logits, min(rows, len(logits)))
    bot = torch.topk(-logits, min(rows, len(logits)))
    hv, hh = histogram(logits.numpy())
    name = lambda i: vocab[i] if i < len(vocab) else f"<{i}>"  # noqa: E731
    return {"pos_str": [name(i) for i in top.indices.tolist()], "pos_values": _round(top.values),
            "neg_str": [name(i) for i in bot.indices.tolist()], "neg_values": _round(-bot.values),
            "logits_hist_data_bar_heights": hh, "logits_hist_data_bar_values": hv}


def neighbours(directions: torch.Tensor, latents: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` nearest other latents of each of ``latents`` by decoder cosine: (indices, cosines)."""
    cos = directions[torch.as_tensor(latents, dtype=torch.long)] @ directions.T
    cos[torch.arange(len(latents)), torch.as_tensor(latents, dtype=torch.long)] = -2.0
    top = torch.topk(cos, min(n, directions.shape[0] - 1), dim=1)
    return top.indices.numpy(), top.values.numpy()


def batch_features(sae, t: Tokens, latents: list[int], vocab: list[str], W_U: torch.Tensor | None, opts,
                   extra: dict[int, dict], n_contexts: int, context_len: int, dataset: str,
                   labels: tuple[list[str], np.ndarray] | None = None) -> list[dict]:
    """The SAEDashboard feature dicts of ``latents`` (``opts``: the spec's dashboards section;
    ``extra``: per latent the ``saeray`` fields known before this item, groups, concept, influence;
    ``labels``: planted labels of the rows of ``t`` (storyworld), which explain each latent)."""
    from .explain import explain

    lat = np.asarray(latents, dtype=np.int64)
    r, c, v = encode(sae, t.acts, lat)
    order = np.lexsort((r, c))
    r, c, v = r[order], c[order], v[order]
    bounds = np.searchsorted(c, np.arange(len(lat) + 1))
    dirs = sae.directions()
    raw = (sae.W_dec.detach().float() / sae.input_scale.float())
    nb_i, nb_c = neighbours(dirs, lat, opts.neighbours)
    rng = np.random.default_rng([opts.seed, int(lat[0]) if len(lat) else 0])
    feats = []
    for j, latent in enumerate(lat.tolist()):
        rows_j, vals_j = r[bounds[j]:bounds[j + 1]], v[bounds[j]:bounds[j + 1]]
        hv, hh = histogram(vals_j)
        d = raw[latent]
        mag = d.abs()
        al = torch.topk(mag, min(ALIGN_ROWS, len(mag)))
        feats.append({
            "feature_index": latent,
            "neuron_alignment_indices": al.indices.tolist(),
            "neuron_alignment_values": _round(d[al.indices]),
            "neuron_alignment_l1": _round(al.values / mag.sum().clamp_min(1e-12)),
            "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
            "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
            **logit_lens(d, W_U, vocab, opts.logit_rows),
            "frac_nonzero": round(len(vals_j) / max(1, len(t)), 7),
            "freq_hist_data_bar_values": hv, "freq_hist_data_bar_heights": hh,
            "n_prompts_total": n_contexts, "n_tokens_in_prompt": context_len, "dataset": dataset,
            "decoder_weights_dist": [],
            "activations": contexts(t, rows_j, vals_j, vocab, top=opts.top, quantiles=opts.quantiles,
                                    per_quantile=opts.per_quantile, before=opts.before, after=opts.after, rng=rng),
            "saeray": {"n_fired": int(len(vals_j)), "max_act": round(float(vals_j.max()), 5) if len(vals_j) else 0.0,
                       "neighbours": [int(i) for i in nb_i[j]], "neighbour_cos": _round(nb_c[j], 4),
                       **(explain(rows_j, *labels) if labels is not None else {}),
                       **extra.get(latent, {})},
        })
    return feats
