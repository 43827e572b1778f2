"""Report plots (PNG, matplotlib's Agg backend: no display needed): the sparsity/fidelity
trade-off per hook point and architecture."""
from __future__ import annotations

import io

ARCH_MARKERS = {"relu": "o", "topk": "s", "batchtopk": "D", "gated": "^", "jumprelu": "v", "gba": "P"}


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
    for i, hp in enumerate(hps):
        for r in (r for r in pts if series(r) == hp):
            ax.scatter(max(r["l0"], 1e-3), r[y], color=cmap(i), marker=ARCH_MARKERS.get(r["arch"], "x"), s=46,
                       edgecolor="black", linewidth=0.4)
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
