"""The gradient job: activations and the gradient of the next-token loss with respect to them, at
the hook points a request names — the pool's gradient mode, which the attribution sweeps (GradSAE,
methods.md §2) stand on.

The first requested hook point of a forward becomes a leaf that requires grad; later ones are
recorded as they are (they already depend on it), so the gradient at an early hook point includes
every path through the later layers, exactly as autograd on the whole model gives it. The loss is
the mean next-token NLL over the batch's kept targets (``payload["keep"]``, as evaluation counts
them). Pair it with :func:`saeray.models.pool.grad_ranges` so the requested layers and the logits
are in one stage. A plain pool job (see :mod:`saeray.models.pool`).
"""
from __future__ import annotations

import numpy as np
import torch


class GradientJob:
    logits = True
    grad = True

    def __init__(self, stage, device: torch.device, hookpoints: list[str]):
        self.hookpoints = list(hookpoints)
        self.device = device

    def begin(self, item: str) -> None:
        self.leaves: dict[str, torch.Tensor] = {}
        self.out: list[dict] = []

    def capture(self, payload: dict) -> list[str]:
        return []

    def interventions(self, payload: dict):
        def mark(hp: str):
            def f(act: torch.Tensor) -> torch.Tensor:
                t = act if act.requires_grad else act.detach().requires_grad_(True)
                self.leaves[hp] = t
                return t
            return f
        return {hp: mark(hp) for hp in self.hookpoints} or None

    def on_acts(self, payload: dict, acts: dict) -> None:
        pass

    def on_output(self, payload: dict, logits: torch.Tensor) -> dict:
        ids = torch.from_numpy(np.array(payload["ids"])).to(logits.device)
        valid = torch.from_numpy(np.array(payload["keep"])[:, 1:]).to(logits.device)
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)[valid]
        loss = nll.mean()
        names = [hp for hp in self.hookpoints if hp in self.leaves]
        grads = torch.autograd.grad(loss, [self.leaves[hp] for hp in names]) if names else []
        self.out.append({"loss": float(loss.detach()), **{hp: {"act": self.leaves[hp].detach().cpu(), "grad": g.detach().cpu()}
                                                 for hp, g in zip(names, grads)}})
        self.leaves = {}
        return {"loss": self.out[-1]["loss"]}

    def finish(self, item: str) -> list[dict]:
        """One dict per batch: ``loss`` and, per hook point, ``act`` and ``grad`` [batch, pos, d]."""
        return self.out
