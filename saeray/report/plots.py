"""Report plots (PNG, matplotlib's Agg backend: no display needed): the sparsity/fidelity
trade-off per hook point and architecture."""
from __future__ import annotations

import io

ARCH_MARKERS = {"relu": "o", "topk": "s", "batchtopk": "D", "gated": "^", "jumprelu": "v", "gba": "P"}


def variant_labels(rows: list[dict], series) -> list[str | None]:
    """Per row, what tells it apart from the other points of its colour and marker (its k, l1,
    width or options, e.g. GBA's htf), or None when it has no twin there: a marker says the
    architecture, so two variants of one architecture at one hook point need a word each."""
    from collections import Counter

    def key(r: dict) -> tuple:
        return series(r), r["arch"]

    twins = Counter(map(key, rows))
    widths: dict[tuple, set] = {}
    for r in rows:
        widths.setdefault(key(r), set()).add(r["width"])
    out = []
    for r in rows:
        if twins[key(r)] < 2:
            out.append(None)
            continue
        parts = [f"w {r['width']}"] if len(widths[key(r)]) > 1 else []
        parts += [f"{n} {r[n]:g}" for n in ("k", "l1") if r.get(n) is not None]
        parts += [r["opts"]] if r.get("opts") else []
        out.append(", ".join(parts) or None)
    return out


def tradeoff_png(rows: list[dict], y: str, ylabel: str, title: str) -> bytes | None:
    """Scatter of L0 (x, log) against ``y``; one colour per hook point, one marker per arch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("l0") is not None and r.get(y) is not None]
    if not pts:
        return None
    many = len({(r.get("model"), r.get("revision")) for r in pts}) > 1

    def series(r: dict) -> str:   # one colour per hook point, per target when there are several
        return f"{r.get('model')}@{r.get('revision')} {r['hookpoint']}" if many else r["hookpoint"]

    hps = list(dict.fromkeys(series(r) for r in pts))
    cmap = plt.get_cmap("viridis", max(len(hps), 2))
    fig, ax = plt.subplots(figsize=(9.5, 4.5), dpi=110)
    labels = dict(zip(map(id, pts), variant_labels(pts, series)))
    for i, hp in enumerate(hps):
        for r in (r for r in pts if series(r) == hp):
            ax.scatter(max(r["l0"], 1e-3), r[y], color=cmap(i), marker=ARCH_MARKERS.get(r["arch"], "x"), s=46,
                       edgecolor="black", linewidth=0.4)
            if labels[id(r)]:
                ax.annotate(labels[id(r)], (max(r["l0"], 1e-3), r[y]), xytext=(5, 4), textcoords="offset points",
                            fontsize=7)
    for i, hp in enumerate(hps):
        ax.scatter([], [], color=cmap(i), marker="o", label=hp)
    for a, m in ARCH_MARKERS.items():
        if any(r["arch"] == a for r in pts):
            ax.scatter([], [], color="grey", marker=m, label=a)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")   # 12, not 1.2×10¹, on a narrow log range
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("L0 (active latents per token, held-out)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    # beside the axes: inside, a legend of many targets x hook points covers the points it explains
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def gradsae_scatter_png(rows: list[dict]) -> bytes | None:
    """|GradSAE score| against |exact ablation effect|, one panel per (hook point, SAE), log scales
    (values below 1e-9 drawn at 1e-9), with each panel's Spearman ρ over all its points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy.stats import spearmanr

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("gradsae") is not None and r.get("exact") is not None:
            groups.setdefault((r["hookpoint"], r["sae"]), []).append(r)
    if not groups:
        return None
    n = len(groups)
    ncol = min(4, n)
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol + 0.6, 2.5 * nrow + 0.4), dpi=100, squeeze=False)
    for ax, ((hp, sae), g) in zip(axes.flat, groups.items()):
        x = np.maximum(np.abs([r["gradsae"] for r in g]), 1e-9)
        y = np.maximum(np.abs([r["exact"] for r in g]), 1e-9)
        ax.scatter(x, y, s=4, alpha=0.35, color="#4f6fb0", linewidth=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        rho = spearmanr(x, y).statistic if len(g) > 2 else float("nan")
        ax.set_title(f"{hp} {sae}\nρ = {rho:.2f}, {len(g)} points", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.supxlabel("|GradSAE score|", fontsize=9)
    fig.supylabel("|exact effect|", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
