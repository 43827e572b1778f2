"""Group Bias Adaptation (GBA): Chen, Sheen, Xiong, Wang, Yang 2025, "Taming Polysemanticity in LLMs:
Provable Feature Recovery via Sparse Autoencoders" (arXiv 2506.14002; ICLR 2026 OpenReview VtWkPIbAQ8;
Algorithm 1). Notes with sources: methods.md §1.2-1.3.

Model (tied, as in the paper's theory): neuron m has one unit vector w_m used to detect and to write,
an output scale a_m, a bias b_m, and a shared pre-bias b_pre:

    y_m = w_mᵀ(x − b_pre) + b_m,   f_m = ReLU(y_m),   x̂ = Σ_m a_m w_m f_m + b_pre
    L = ‖x − x̂‖²                   reconstruction only: no L1, no TopK

Gradients train w (renormalised to the unit sphere after each step, parallel gradient removed) and
a. The biases b get *no gradient*; they are set by the controller (Algorithm 1):

* neurons are split into K groups (random permutation, seeded); group k has target activation
  frequency p_k = HTF · (LTF/HTF)^{(k−1)/(K−1)} (geometric spacing);
* over each window we record, per neuron, the firing frequency p̂_m and the peak pre-activation
  r_m = max(0, max y_m); r̄_k is the mean of the positive r_m in group k;
* at the end of the window: if p̂_m > p_k then b_m ← max(b_m − γ₋ r_m, −1) (more selective);
  if p̂_m < ε (dead) then b_m ← min(b_m + γ₊ r̄_k, 0) (more sensitive); otherwise unchanged.

Defaults and where each comes from (docs/benchmarks.md, "Recovery across a family", has the runs):

* K = 10 groups: the paper (results stable for K ≥ 10).
* HTF = 0.1: the v1 LLM setting. The ICLR text's HTF = 0.5 ("a random neuron fires half the time")
  was measured here to wreck recovery: the top groups fire on half of all tokens, learn dense
  directions, and on the planted family L0 went to 11-27 against a true 0.8-2.2 with FRR 0.88, 0.42
  and 0.00 on three settings (lr 2e-2, same controller).
* LTF = 1e-4: the low end of the ICLR text's 1e-3..1e-4. The v1 value 1e-3 leaves features rarer
  than 1e-3 without a group whose target lies near their frequency (the paper's "neuron resonance":
  a neuron locks onto a feature only when its target is near the feature's frequency; the paper's
  wrong-range run recovers 38 %). On the family, 1e-4 recovered as much or more at a lower L0.
  The supported feature-frequency range is therefore [1e-4, 1e-1].
* Inside the range is not enough when the data's frequencies stop far below HTF. Algorithm 1 only
  lowers a bias while its neuron fires above target, so a neuron settles at about its group's
  target whatever the data: groups whose targets exceed every feature's frequency fire densely on
  mixtures, and those dense, tied neurons reconstruct so much of every token that the selective
  groups do not lock on either. Measured on the family's d32-8x-rare (frequencies 1e-4..1e-2,
  3M tokens, one seed): FRR@0.9 0.09 at HTF 0.1 (L0 5.6 against a true 0.55), 0.85 at HTF 0.01
  (L0 1.2). The same change did not help where the frequencies reach 0.02-0.03 (d32-8x at HTF 0.03:
  0.72 vs 0.74; d96-rare-heavy at HTF 0.02: 0.69 vs 0.71), so HTF stays 0.1; a user whose features
  are all rarer than about 1 % should lower ``htf`` to the densest frequency expected
  (docs/training.md). The same rule upward: on SAELens's synthetic suite (features up to 0.3)
  ``htf`` 0.3 took explained variance from 0.43 to 0.65 at width 1× (docs/benchmarks.md).
* Width: the L0 is at most about width × the mean target (0.019 with the range above), and the targets
  are spread over the whole range whatever the data's frequencies, so GBA needs more neurons than
  features. Recovery at cosine 0.9 at width 1×/2×/4× the features (planted, 3M tokens): 0.54/0.82/1.00
  with d = 96 and true L0 4.2, 0.63/0.97/1.00 with d = 256 and true L0 6.4 (docs/training.md).
* ε = 1e-6 ("never fired in the window": a third-party re-implementation's value).
* The controller's window and step are the paper's (25,600 tokens = 50 steps × batch 512; γ = 0.01)
  *when the run is long enough for them*: the paper's runs see about 4,000 windows, so each bias can
  move about 40 r over training and settles within the first ~1 %. A run of a few million tokens with
  the paper's window sees 100-300 windows; at γ = 0.01 the biases are still far from their targets
  when training ends (measured: FRR 0.39 with L0 4.5× the true L0 on a planted d = 96 setting where
  the settled controller reaches 0.99). :meth:`configure_for_run` therefore keeps the window at the
  paper's 25,600 tokens but shortens it so a run has at least 300 windows, and takes
  γ = clamp(15 / windows, 0.01, 0.05): bias movement over the run ≥ 15 r, the paper's γ on runs of
  ≥ 1,500 windows. ``every``/``gamma_*`` set explicitly are kept as given.
* Learning rate 2e-2 (:meth:`default_lr`): GBA's only trained directions are the tied unit rows w_m,
  moved by Adam about lr per coordinate per step, and the decoder cannot run ahead of the encoder as
  in an untied SAE. On a planted d = 96 setting (3M tokens) recovery at cosine 0.9 was 0.39 at
  lr 1e-3 with the paper's controller, 0.72 at 1e-3 with a run-sized one, 0.93 at 1e-2 (paper's
  controller), and 0.99-1.00 at 2e-2 and at 4e-2 (run-sized). Between 2e-2 and 4e-2: 0.70 vs 0.62
  on a rare-feature, heavy-tailed setting, 0.69 vs 0.75 on a d = 32, 8× superposition one; 2e-2
  was kept. The trainer's warm-up and linear decay to 0 apply.
* Per-group step size, ``step_balance`` (ours, not the paper's; off, 0, by default): the optimizer's
  step on neuron m's direction w_m is multiplied by (HTF / p_k)^step_balance, so at 0.5 group 0
  moves at the learning rate and the 1e-4 group at ~32×; the output scales a and Adam's state are
  untouched (:meth:`row_step_scale`, applied by the trainer). Why it exists: a neuron's direction
  learns only from the tokens it fires on, so at one learning rate the low-target groups barely
  leave their random start. On the family's d32-8x (1M tokens, one seed) groups 5-9 (targets
  ≤ 2.2e-3, half the neurons) ended with a best cosine to any true feature of 0.44-0.48, what an
  untrained unit vector in d = 32 gets, and recovered no feature (rarest frequency quartile 3 %
  recovered, FRR@0.9 0.43); at 0.5 groups 3-7 recovered 73 features (rarest quartile 44 %, FRR@0.9
  0.74). Why it is off: across the family (3M tokens, two seeds) 0.5 raised recovery on 5 settings
  and lowered it on 3 (mean 0.699 → 0.712; d96-rare-heavy 0.71 → 0.63), met no target the default
  misses, cost MCC on SAELens's suite (0.826 → 0.770) and, on the storyworld model's residual
  stream, CE loss recovered at every layer (e.g. 0.985 → 0.964, 0.917 → 0.888) at a lower FVU;
  on SmolLM2 it was about even (CE loss recovered 0.983 → 0.978, 0.953 → 0.953, 0.928 → 0.930).
  docs/benchmarks.md, "GBA's step per group".
* Bias init, ``bias_init`` (the paper does not say; ``"zero"``, every b_m = 0, by default): ``"target"``
  starts each neuron's bias where it fires at its group's target on the trainer's 16k-row init sample
  (:meth:`init_from_data`, clamped into [−1, 0]). Why it exists: at b = 0 a neuron of centred data
  fires on about half the tokens, so for the first windows, until the controller has lowered every
  bias, all neurons train their directions on dense firing at lr 2e-2, and under superposition the
  rare groups start from those dense mixtures. On the family (3M tokens, one seed, 2026-12-05)
  "target" raised recovery at cosine 0.9 on 6 of 8 settings (d32-8x 0.72 → 0.88, d32-8x-rare
  0.09 → 0.39, d96-w1 0.52 → 0.63, d256 0.62 → 0.70) and lowered it on two (d96-rare-heavy
  0.71 → 0.68, d96-w4-lognormal 0.958 → 0.953); it met no 0.9 target the default misses. Why it is
  off: on the storyworld audit's residual stream it lowered CE loss recovered at all four layers
  (0.996 → 0.988, 0.985 → 0.965, 0.943 → 0.938, 0.917 → 0.882) at a lower FVU, as ``step_balance``
  did. docs/benchmarks.md, "GBA's bias init".
* φ = ReLU (the theory's activation) by default, so the trained SAE *is* a standard ReLU SAE
  (W_enc = Wᵀ, b_enc = b, W_dec = diag(a) W, b_dec = b_pre) and is saved as SAELens ``standard``.
  ``act="jumprelu"`` is our reading of the paper's LLM runs: the bias only gates,
  f_m = u_m · 1[u_m + b_m > 0] with u_m = w_mᵀ(x − b_pre), so the output is not shrunk by b_m; it
  is saved as SAELens ``jumprelu`` with b_enc = 0 and threshold = −b.
* Tied weights with a learned output scale a_m (init 1) rather than a → 0.
* The bias range [−1, 0] presumes inputs at unit scale, which the trainer's E‖x‖² = 1 scaling
  provides.
* b_pre is fixed at its data init (geometric median) by default (``train_b_pre=False``): when trained,
  its gradient through the encoder shifts every pre-activation up and undoes the controller (on a
  planted benchmark L0 went from ≈4.6 to ≈30 and the high-TAF group fired at 1.5× its target).
* r̄_k of a group with no positive r falls back to the mean over all neurons, then to 1.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import SAE, SAEOutput


def group_targets(groups: int, htf: float, ltf: float) -> Tensor:
    if groups == 1:
        return torch.tensor([htf], dtype=torch.float64)
    k = torch.arange(groups, dtype=torch.float64)
    return htf * (ltf / htf) ** (k / (groups - 1))


class GBASAE(SAE):
    arch = "gba"
    saelens_arch = "standard"

    PAPER_WINDOW_TOKENS = 25_600    # 50 steps × batch 512
    PAPER_GAMMA = 0.01
    MIN_WINDOWS = 300

    def __init__(self, d_in: int, width: int, groups: int = 10, htf: float = 0.1, ltf: float = 1e-4,
                 gamma_up: float | None = None, gamma_down: float | None = None, every: int | None = None,
                 eps: float = 1e-6, train_b_pre: bool = False, act: str = "relu", step_balance: float = 0.0,
                 bias_init: str = "zero"):
        super().__init__(d_in, width)
        if act not in ("relu", "jumprelu"):
            raise ValueError(f"act='{act}' must be 'relu' or 'jumprelu'")
        self.act = act
        # a gate-only bias leaves the output unshrunk; SAELens then sees a JumpReLU with θ = −b
        self.saelens_arch = "standard" if act == "relu" else "jumprelu"
        if groups < 1 or groups > width:
            raise ValueError(f"groups={groups} must be in 1..width={width}")
        self.groups, self.htf, self.ltf = int(groups), float(htf), float(ltf)
        self._given = {"gamma_up": gamma_up, "gamma_down": gamma_down, "every": every}
        # the paper's values until configure_for_run sizes them to the run
        self.gamma_up = float(gamma_up) if gamma_up is not None else self.PAPER_GAMMA
        self.gamma_down = float(gamma_down) if gamma_down is not None else self.PAPER_GAMMA
        self.every = int(every) if every is not None else max(1, self.PAPER_WINDOW_TOKENS // 512)
        self.eps = float(eps)
        if step_balance < 0:
            raise ValueError(f"step_balance={step_balance:g} must be >= 0 (0: one learning rate for every group)")
        self.step_balance = float(step_balance)
        if bias_init not in ("zero", "target"):
            raise ValueError(f"bias_init='{bias_init}' must be 'zero' or 'target'")
        self.bias_init = bias_init
        W = torch.randn(width, d_in)
        self.W = nn.Parameter(W / W.norm(dim=1, keepdim=True))
        self.a = nn.Parameter(torch.ones(width))
        self.train_b_pre = bool(train_b_pre)
        self.b_pre = nn.Parameter(torch.zeros(d_in), requires_grad=self.train_b_pre)
        self.register_buffer("bias", torch.zeros(width))
        # group of each neuron: a seeded random permutation split into equal blocks
        group = torch.empty(width, dtype=torch.long)
        group[torch.randperm(width)] = torch.arange(width) * self.groups // width
        self.register_buffer("group", group)
        self.register_buffer("target", group_targets(self.groups, self.htf, self.ltf)[group].float())
        # window statistics (buffers so a checkpoint resumes mid-window exactly)
        self.register_buffer("win_fires", torch.zeros(width, dtype=torch.long))
        self.register_buffer("win_peak", torch.zeros(width))
        self.register_buffer("win_tokens", torch.zeros((), dtype=torch.long))
        self.register_buffer("win_steps", torch.zeros((), dtype=torch.long))

    def default_lr(self) -> float:
        return 2e-2

    @torch.no_grad()
    def init_from_data(self, xs: Tensor) -> None:
        """``bias_init="target"``: each bias starts where its neuron fires at its group's target on
        the init sample (the (1 − p_k) quantile of its pre-activation), clamped into [−1, 0]."""
        if self.bias_init != "target":
            return
        u = ((xs - self.b_pre) @ self.W.t()).float()
        n = u.shape[0]
        q = torch.empty(self.width, device=u.device)
        # one order statistic per group, not a sort of every column: at an audit width of 16k a full
        # sort of the [16k rows × width] sample holds ~3 GB of values and indices beside u
        for p in self.target.unique():
            cols = (self.target == p).nonzero().squeeze(1)
            k = int(((1 - p) * (n - 1)).round().clamp(0, n - 1)) + 1
            q[cols] = u[:, cols].kthvalue(k, dim=0).values
        self.bias.copy_((-q).clamp(-1.0, 0.0))

    def row_step_scale(self) -> Tensor | None:
        """Each neuron's direction step × (HTF / its group's target)^step_balance (module docstring)."""
        if self.step_balance == 0:
            return None
        return (self.htf / self.target).clamp_min(1.0) ** self.step_balance

    def configure_for_run(self, steps: int, batch_tokens: int) -> None:
        """Controller window and step for a run of ``steps`` batches of ``batch_tokens`` (module
        docstring: the paper's values when the run is long enough for them)."""
        tokens = steps * batch_tokens
        window = min(self.PAPER_WINDOW_TOKENS, max(batch_tokens, tokens // self.MIN_WINDOWS))
        every = max(1, round(window / batch_tokens))
        gamma = min(0.05, max(self.PAPER_GAMMA, 15 / max(1, steps // every)))
        g = self._given
        self.every = int(g["every"]) if g["every"] is not None else every
        self.gamma_up = float(g["gamma_up"]) if g["gamma_up"] is not None else gamma
        self.gamma_down = float(g["gamma_down"]) if g["gamma_down"] is not None else gamma

    # SAELens view of the tied parameters
    @property
    def W_enc(self) -> Tensor:
        return self.W.t()

    @property
    def W_dec(self) -> Tensor:
        return self.a[:, None] * self.W

    @property
    def b_enc(self) -> Tensor:
        return self.bias if self.act == "relu" else torch.zeros_like(self.bias)

    @property
    def b_dec(self) -> Tensor:
        return self.b_pre

    def decoder_param(self) -> nn.Parameter:
        return self.W

    def directions(self) -> Tensor:
        return self.W.detach().float() * torch.sign(self.a.detach().float())[:, None]

    def encode_scaled(self, xs: Tensor) -> tuple[Tensor, Tensor]:
        u = (xs - self.b_pre) @ self.W.t()
        pre = u + self.bias
        if self.act == "relu":
            return pre.relu(), pre
        return u * (pre > 0), pre

    @torch.no_grad()
    def on_step(self, out: SAEOutput, n_tokens: int) -> None:
        super().on_step(out, n_tokens)
        pre = out.pre.float()
        self.win_fires += (pre > 0).sum(0)
        self.win_peak.copy_(torch.maximum(self.win_peak, pre.max(0).values.clamp_min(0)))
        self.win_tokens += pre.shape[0]
        self.win_steps += 1
        if int(self.win_steps) >= self.every:
            self.adapt()

    @torch.no_grad()
    def adapt(self) -> None:
        """One round of Algorithm 1 on the window's statistics, then clear the window."""
        p_hat = self.win_fires.float() / self.win_tokens.clamp_min(1).float()
        r = self.win_peak
        pos = (r > 0).float()
        sums = torch.zeros(self.groups, device=r.device).index_add_(0, self.group, r * pos)
        cnts = torch.zeros(self.groups, device=r.device).index_add_(0, self.group, pos)
        fallback = (r.sum() / pos.sum()) if pos.sum() > 0 else torch.ones((), device=r.device)
        r_bar = torch.where(cnts > 0, sums / cnts.clamp_min(1), fallback)[self.group]
        too_often = p_hat > self.target
        dead = p_hat < self.eps
        b = self.bias
        b.copy_(torch.where(too_often, (b - self.gamma_down * r).clamp_min(-1.0), b))
        b.copy_(torch.where(dead, (b + self.gamma_up * r_bar).clamp_max(0.0), b))
        self.win_fires.zero_()
        self.win_peak.zero_()
        self.win_tokens.zero_()
        self.win_steps.zero_()

    def group_frequencies(self, freq: Tensor) -> list[dict]:
        """Per group: target TAF and the mean / median measured frequency of its neurons."""
        rows = []
        t = group_targets(self.groups, self.htf, self.ltf)
        for k in range(self.groups):
            m = freq[self.group.to(freq.device) == k].float()
            rows.append({"group": k, "target": float(t[k]), "mean": float(m.mean()), "median": float(m.median())})
        return rows

    def hparams(self) -> dict:
        return {"groups": self.groups, "htf": self.htf, "ltf": self.ltf, "gamma_up": self.gamma_up,
                "gamma_down": self.gamma_down, "every": self.every, "eps": self.eps,
                "train_b_pre": self.train_b_pre, "act": self.act, "step_balance": self.step_balance,
                "bias_init": self.bias_init}

    @torch.no_grad()
    def export(self) -> dict[str, Tensor]:
        t = super().export()
        if self.act == "jumprelu":
            t["threshold"] = (-self.bias).float().clamp_min(0).clone()
        return t
