"""What every SAE architecture shares: the SAELens parameter names, input scaling, decoder norms,
dead-latent tracking, and the forward output.

Notation follows SAELens (``W_enc [d_in, width]``, ``b_enc [width]``, ``W_dec [width, d_in]``,
``b_dec [d_in]``; rows of ``W_dec`` are latent directions) so export is a plain rename.

Input scaling: the trainer sets the scalar buffer ``input_scale = c`` so that ``E‖c·x‖² = target``
(default 1); every loss is computed on the scaled input ``c·x`` and the reconstruction is returned in
raw units. On export the scale is folded into the weights (``W_enc·c``, ``W_dec/c``, ``b_dec/c``): the
latent values are unchanged and the saved SAE works on raw activations with
``normalize_activations: "none"`` (the way SAELens itself folds scaling before an inference save).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class SAEOutput:
    """What ``SAE.forward`` returns.

    recon [B, d_in] in raw units; latents [B, width], the dense code; losses, already weighted
    (total = sum); pre, the scaled-space pre-activations (per-arch statistics).
    A sparse-decoding SAE (TopK, BatchTopK) passes ``codes = (rows, cols, vals)`` [nnz] (no
    gradient) and ``width`` instead of ``latents``: the dense [B, width] tensor is then built only
    when something reads ``latents``, and the per-step statistics (:meth:`fired`,
    :meth:`positive_values`) read the triplets directly.
    """

    def __init__(self, recon: Tensor, latents: Tensor | None = None, losses: dict[str, Tensor] | None = None,
                 pre: Tensor | None = None, codes: tuple[Tensor, Tensor, Tensor] | None = None,
                 width: int | None = None):
        if latents is None and (codes is None or width is None):
            raise ValueError("SAEOutput needs latents, or codes and width")
        self.recon, self._latents, self.pre = recon, latents, pre
        self.losses = {} if losses is None else losses
        self.codes, self.width = codes, width

    @property
    def latents(self) -> Tensor:
        if self._latents is None:
            rows, cols, vals = self.codes
            with torch.no_grad():
                self._latents = vals.new_zeros(self.recon.shape[0], self.width).index_put_((rows, cols), vals)
        return self._latents

    @torch.no_grad()
    def fired(self) -> Tensor:
        """[width] bool: latents positive on at least one token of the batch."""
        if self._latents is None:
            _, cols, vals = self.codes
            return torch.zeros(self.width, dtype=torch.bool, device=vals.device).index_fill_(0, cols[vals > 0], True)
        return (self._latents > 0).any(0)

    @torch.no_grad()
    def positive_values(self) -> Tensor:
        """The positive latent values of the batch, flattened (order unspecified)."""
        if self._latents is None:
            vals = self.codes[2]
            return vals[vals > 0]
        return self._latents[self._latents > 0]


def width_scaled_lr(width: int) -> float:
    """Gao et al.'s width scaling, lr ∝ width^-1/2, as 6e-4 / sqrt(width / 2^14), capped at 1e-2:
    the default of every untied architecture. dictionary_learning's TopK constant is 2e-4 at 2^14
    (1.1-1.3e-3 at the widths below); on the planted family (3M-token runs) about 3× that recovered
    more than ~1e-3 with no setting worse — TopK 0.938 → 1.000 (d = 96, width 384, 1e-3 vs 3.9e-3),
    0.883 → 0.941 (d = 32, 8× superposition, width 512, 1e-3 vs 3e-3) — and the L1 family at a flat
    1e-3 recovered far less than at the width-scaled 4.8e-3 (ReLU 0.09 vs 0.55, Gated 0.36 vs 0.82,
    JumpReLU 0.38 vs 0.77 on `saeray bench recovery`'s setting, width 256).
    docs/benchmarks.md, "Recovery across a family"."""
    return min(1e-2, 6e-4 / (width / 2 ** 14) ** 0.5)


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm; the b_dec init used by the TopK and standard-SAE references."""
    x = x.float()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(eps)
        m_new = (w[:, None] * x).sum(0) / w.sum()
        if (m_new - m).norm() < eps * max(1.0, m.norm().item()):
            return m_new
        m = m_new
    return m


class SAE(nn.Module):
    """Base class. Subclasses implement ``encode_scaled`` and ``loss_terms`` and may override
    ``on_step`` (statistics that are not gradients: thresholds, bias adaptation)."""

    arch = "base"               # our registry name
    saelens_arch = "standard"   # the SAELens ``architecture`` it is saved as
    unit_norm_decoder = True    # rows of W_dec kept at unit norm (parallel gradient removed)

    def __init__(self, d_in: int, width: int):
        super().__init__()
        self.d_in, self.width = d_in, width
        self.register_buffer("input_scale", torch.ones(()))
        # tokens since each latent last fired; dead = ">= dead_tokens" (Gao et al.: 10M tokens)
        self.register_buffer("tokens_since_fired", torch.zeros(width, dtype=torch.long))
        self.dead_tokens = 10_000_000

    # -- parameters -----------------------------------------------------------------------------
    def _init_standard(self) -> None:
        """Random unit decoder rows, encoder = decoderᵀ (tied init, trained untied), zero biases."""
        W = torch.randn(self.width, self.d_in)
        W = W / W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W.clone())
        self.W_enc = nn.Parameter(W.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(self.width))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))

    def default_lr(self) -> float:
        """Adam learning rate when neither the variant nor the run sets one."""
        return width_scaled_lr(self.width)

    def configure_for_run(self, steps: int, batch_tokens: int) -> None:
        """Resolve settings that depend on the run's length (called once by the trainer before
        the first step, identically on resume); the default has none."""

    def init_from_data(self, xs: Tensor) -> None:
        """Data-dependent init beyond ``b_dec`` (called once by the trainer, after the input scale and
        ``b_dec`` are set, with a sample of scaled activations); the default has none."""

    def decoder_param(self) -> nn.Parameter:
        """The parameter whose rows are the latent directions (normalised when the method wants it)."""
        return self.W_dec

    def directions(self) -> Tensor:
        """Unit latent directions [width, d_in] (what feature recovery is measured on)."""
        W = self.W_dec.detach().float()
        return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def row_step_scale(self) -> Tensor | None:
        """Per-row factor on the optimizer's step of :meth:`decoder_param` (a per-latent learning
        rate; Adam's state is untouched), or None for one rate for all rows (every method but GBA)."""
        return None

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        W = self.decoder_param()
        if W.grad is None:
            return
        Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)
        W.grad -= (W.grad * Wn).sum(1, keepdim=True) * Wn

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        W = self.decoder_param()
        W /= W.norm(dim=1, keepdim=True).clamp_min(1e-8)

    # -- computation ----------------------------------------------------------------------------
    def pre_acts(self, xs: Tensor) -> Tensor:
        if torch.is_grad_enabled() and not xs.requires_grad and xs.dtype == self.W_enc.dtype:
            return _Encode.apply(xs, self.b_dec, self.W_enc, self.b_enc)
        return (xs - self.b_dec) @ self.W_enc + self.b_enc

    def encode_scaled(self, xs: Tensor) -> tuple[Tensor, Tensor]:
        """(latents, pre-activations) of the scaled input."""
        raise NotImplementedError

    def loss_terms(self, xs: Tensor, xh: Tensor, f: Tensor, pre: Tensor) -> dict[str, Tensor]:
        return {"mse": mse(xh, xs)}

    def encode(self, x: Tensor) -> Tensor:
        return self.encode_scaled(x * self.input_scale)[0]

    def decode(self, f: Tensor) -> Tensor:
        return (f @ self.W_dec + self.b_dec) / self.input_scale

    def forward(self, x: Tensor) -> SAEOutput:
        xs = x * self.input_scale
        f, pre = self.encode_scaled(xs)
        xh = f @ self.W_dec + self.b_dec
        losses = self.loss_terms(xs, xh, f, pre) if self.training else {"mse": mse(xh, xs)}
        return SAEOutput(xh / self.input_scale, f, losses, pre)

    @torch.no_grad()
    def on_step(self, out: SAEOutput, n_tokens: int) -> None:
        fired = out.fired()
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_tokens

    # -- export (SAELens layout) ----------------------------------------------------------------
    def hparams(self) -> dict:
        """Architecture hyper-parameters (recorded in saeray.json; ``build(**hparams)`` rebuilds)."""
        return {}

    def saelens_cfg(self) -> dict:
        """Architecture-specific SAELens cfg.json fields."""
        return {}

    @torch.no_grad()
    def export(self) -> dict[str, Tensor]:
        """SAELens tensors with the input scale folded in (latent values unchanged)."""
        c = self.input_scale.float()
        return {"W_enc": self.W_enc.detach().float() * c, "b_enc": self.b_enc.detach().float().clone(),
                "W_dec": self.W_dec.detach().float() / c, "b_dec": self.b_dec.detach().float() / c}

    @torch.no_grad()
    def load_export(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`export` for a module with ``input_scale == 1``."""
        for name, t in tensors.items():
            getattr(self, name).copy_(t)


class _Encode(torch.autograd.Function):
    """``(x − b_dec) @ W_enc + b_enc`` for an input that needs no gradient. Autograd would get
    b_dec's gradient from a full [B, width] × [width, d] product, ``−g @ W_encᵀ`` summed over the
    batch; summing first, ``−(Σ_B g) @ W_encᵀ``, is the same number from a vector product: a third
    of the encoder's backward saved (tests/test_sae_train.py compares both)."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc):
        xc = x - b_dec
        ctx.save_for_backward(xc, W_enc)
        return torch.addmm(b_enc, xc, W_enc)

    @staticmethod
    def backward(ctx, g):
        xc, W_enc = ctx.saved_tensors
        gs = g.sum(0)
        return None, -(W_enc @ gs), xc.t() @ g, gs


def mse(xh: Tensor, x: Tensor) -> Tensor:
    """Mean over tokens of the squared error summed over d (≈ FVU when E‖x‖² = 1 and x is centred)."""
    return (xh.float() - x.float()).pow(2).sum(-1).mean()
