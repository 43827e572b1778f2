"""How well a concept can be read from a layer: the best single SAE latent, k-sparse probes on the
SAE's latents (SAEBench's sparse probing) and a linear probe on the raw activations (the ceiling).

Every measure is fitted on a train split and scored on a test split of different documents:

* **latent**: the latent with the best train AUROC (its activation as the score, ties counted
  half); the F1 threshold is also chosen on train;
* **sparse k**: the k latents whose mean activation differs most between the concept's tokens and
  the rest (on train), then a logistic regression on those k;
* **linear**: a logistic regression on the standardised raw activations.

Reported per measure: test AUROC and test F1 at the train-chosen threshold. All concepts of a layer
are fitted at once (independent logistic regressions in one batched L-BFGS problem), so a layer
costs a few seconds on a CPU whatever the number of concepts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

L2 = 1e-3            # on standardised inputs: a light ridge, so separable concepts keep finite weights
LBFGS_ITERS = 50      # a probe's AUROC stops moving well before the loss has fully converged


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Per column, 1-based ranks of ``x`` [N, W] with ties sharing their average rank (float64)."""
    # rows of a contiguous [W, N]: torch sorts a strided dim 0 several times slower
    xt = x.T.contiguous()
    n = xt.shape[1]
    sv, si = xt.sort(1)
    pos = torch.arange(n, device=x.device).expand_as(sv)
    starts = torch.ones_like(sv, dtype=torch.bool)
    starts[:, 1:] = sv[:, 1:] != sv[:, :-1]
    ends = torch.ones_like(sv, dtype=torch.bool)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
    last = torch.where(ends, pos, torch.full_like(pos, n)).flip(1).cummin(1).values.flip(1)
    avg = (first + last).double() / 2 + 1
    return torch.empty_like(avg).scatter_(1, si, avg).T


def auroc_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """AUROC of every column of ``x`` [N, W] for every label column of ``y`` [N, C] -> [C, W]
    (Mann-Whitney; NaN where a concept has no positives or no negatives)."""
    r = ranks(x)
    yd = y.double()
    n1 = yd.sum(0)
    n0 = y.shape[0] - n1
    u = yd.T @ r - (n1 * (n1 + 1) / 2)[:, None]
    return u / (n1 * n0).clamp_min(1)[:, None] + torch.where((n1 * n0)[:, None] > 0, 0.0, float("nan"))


def auroc(score: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per column AUROC of paired ``score`` [N, C] and ``y`` [N, C] -> [C]."""
    r = ranks(score)
    yd = y.double()
    n1 = yd.sum(0)
    n0 = y.shape[0] - n1
    u = (yd * r).sum(0) - n1 * (n1 + 1) / 2
    return torch.where(n1 * n0 > 0, u / (n1 * n0).clamp_min(1), torch.full_like(u, float("nan")))


def best_thresholds(score: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per column, the threshold t maximising F1 of ``score >= t`` on (score, y) [N, C] -> [C]."""
    sv, si = score.sort(0, descending=True)
    ys = y.gather(0, si).double()
    tp = ys.cumsum(0)
    k = torch.arange(1, score.shape[0] + 1, dtype=torch.float64, device=score.device).unsqueeze(1)
    f1 = 2 * tp / (k + ys.sum(0, keepdim=True)).clamp_min(1)
    # only cut between distinct values: a threshold cannot split tied scores
    last_of_tie = torch.ones_like(sv, dtype=torch.bool)
    last_of_tie[:-1] = sv[:-1] != sv[1:]
    f1 = torch.where(last_of_tie, f1, torch.full_like(f1, -1.0))
    return sv.gather(0, f1.argmax(0, keepdim=True)).squeeze(0)


def f1_at(score: torch.Tensor, y: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    pred = score >= thr[None]
    yb = y.bool()
    tp = (pred & yb).sum(0).double()
    return 2 * tp / (pred.sum(0) + yb.sum(0)).double().clamp_min(1)


def fit_logistic(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent class-balanced logistic regressions, one per concept, fitted together.

    ``x``: [N, d] shared by every concept, or [N, C, k] with each concept's own features; ``y``:
    [N, C]. Returns (weights [d, C] or [C, k], bias [C])."""
    shared = x.dim() == 2
    C = y.shape[1]
    w = torch.zeros((x.shape[1], C) if shared else (C, x.shape[2]), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(C, dtype=torch.float64, requires_grad=True)
    yd = y.double()
    n1 = yd.sum(0).clamp_min(1)
    n0 = (y.shape[0] - yd.sum(0)).clamp_min(1)
    weight = yd / (2 * n1) + (1 - yd) / (2 * n0)      # each class carries half the loss
    xd = x.double()
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=LBFGS_ITERS, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_change=1e-7)

    def logits() -> torch.Tensor:
        return (xd @ w if shared else (xd * w[None]).sum(-1)) + b

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits(), yd, reduction="none") * weight).sum()
        loss = loss + L2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = train.mean(0, keepdim=True)
    sd = train.std(0, keepdim=True).clamp_min(1e-6)
    return (train - mu) / sd, (test - mu) / sd


@dataclass
class Split:
    """Train and test rows of one layer: activations (or latents) and labels [N, C]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _scored(train_score: torch.Tensor, test_score: torch.Tensor, s: Split) -> tuple[np.ndarray, np.ndarray]:
    thr = best_thresholds(train_score, s.y_train)
    return auroc(test_score, s.y_test).numpy(), f1_at(test_score, s.y_test, thr).numpy()


def best_latent(s: Split) -> dict:
    """The single latent per concept with the best train AUROC, scored on test."""
    a = auroc_matrix(s.x_train.float(), s.y_train)
    best = torch.nan_to_num(a, nan=-1.0).argmax(1)
    au, f1 = _scored(s.x_train[:, best].double(), s.x_test[:, best].double(), s)
    return {"auroc": au, "f1": f1, "latents": best.numpy()[:, None]}


def sparse_probe(s: Split, k: int) -> dict:
    """Top-k latents by class mean difference (train), a logistic regression on them."""
    x, y = s.x_train.double(), s.y_train.double()
    n1 = y.sum(0).clamp_min(1)
    n0 = (y.shape[0] - y.sum(0)).clamp_min(1)
    diff = (y.T @ x) / n1[:, None] - ((1 - y).T @ x) / n0[:, None]      # [C, W]
    idx = diff.abs().topk(min(k, x.shape[1]), dim=1).indices          # [C, k]
    N, C = x.shape[0], idx.shape[0]
    tr = s.x_train[:, idx.flatten()].view(N, C, -1).double()
    te = s.x_test[:, idx.flatten()].view(s.x_test.shape[0], C, -1).double()
    tr, te = _standardise(tr, te)
    w, b = fit_logistic(tr, s.y_train)
    au, f1 = _scored((tr * w[None]).sum(-1) + b, (te * w[None]).sum(-1) + b, s)
    return {"auroc": au, "f1": f1, "latents": idx.numpy()}


def linear_probe(s: Split) -> dict:
    """Logistic regression on the standardised raw activations: what any linear read-out reaches."""
    tr, te = _standardise(s.x_train.double(), s.x_test.double())
    w, b = fit_logistic(tr, s.y_train)
    au, f1 = _scored(tr @ w + b, te @ w + b, s)
    return {"auroc": au, "f1": f1, "latents": np.zeros((s.y_train.shape[1], 0), dtype=np.int64)}
