"""Emergence figures (PNG, matplotlib Agg): emergence curves (concept x checkpoint, one panel per
size), layer maps (concept x layer, one panel per checkpoint, one figure per size), scale curves
(concept x size at the late checkpoints) and behaviour beside its concepts' emergence."""
from __future__ import annotations

import io
import math


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _value(rows: list[dict], settings: dict) -> dict[tuple, float]:
    """The presence measure's scores, NaN (not scored) left out."""
    from .analysis import score_map

    return {k: v for k, v in score_map(rows, settings["measure"], settings["presence_k"], settings["score"]).items()
            if v is not None and not math.isnan(v)}


def _heat(ax, mat, xlabels, ylabels, title, vmin, present=None, show_y=True):
    import numpy as np

    im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap="viridis", vmin=vmin, vmax=1.0)
    ax.set_xticks(range(len(xlabels)))
    ax.set_xticklabels(xlabels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(ylabels)))
    ax.set_yticklabels(ylabels if show_y else [""] * len(ylabels), fontsize=7)
    ax.set_title(title, fontsize=9)
    if present is not None:
        ys, xs = np.nonzero(present)
        ax.scatter(xs, ys, marker="o", s=9, facecolor="white", edgecolor="black", linewidth=0.4)
    return im


def figures(summary: dict, rows: list[dict]) -> dict[str, bytes]:
    import numpy as np

    plt = _plt()
    st = summary["settings"]
    models, steps, concepts = summary["models"], summary["steps"], summary["concepts"]
    val = _value(rows, st)
    vmin = 0.5 if st["score"] == "auroc" else 0.0
    pres = {(p["model"], p["step"], p["layer"], p["concept"]) for p in summary["present"]}
    layers = {z: sorted({l for (zz, _s, l, _c) in val if zz == z}) for z in range(len(models))}
    label = f"{st['measure']}{'' if st['measure'] != 'sparse' else ' k=' + str(st['presence_k'])} {st['score']}"
    out = {}

    def best_over_layers(cells: list[tuple[int, int]]):
        """[concept, cell] best score over the layers, and presence at any layer, for (size, step) cells."""
        mat = np.full((len(concepts), len(cells)), np.nan)
        p = np.zeros_like(mat, dtype=bool)
        for i, c in enumerate(concepts):
            for j, (z, s) in enumerate(cells):
                vs = [val[(z, s, l, c)] for l in layers[z] if (z, s, l, c) in val]
                mat[i, j] = max(vs) if vs else np.nan
                p[i, j] = any((models[z], s, l, c) in pres for l in layers[z])
        return mat, p

    # emergence curves: best over layers, concept x checkpoint, one panel per size
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models) + 1.5, 0.22 * len(concepts) + 2), dpi=110,
                             squeeze=False)
    for z, m in enumerate(models):
        mat, p = best_over_layers([(z, s) for s in steps])
        im = _heat(axes[0, z], mat, [str(s) for s in steps], concepts, m, vmin, p, show_y=z == 0)
        axes[0, z].set_xlabel("checkpoint (step)", fontsize=8)
    fig.colorbar(im, ax=axes[0, -1], label=f"best layer's {label}")
    fig.suptitle("Emergence: concept x checkpoint (dot: present, step-0 control applied)", fontsize=10)
    out["emergence_curves.png"] = _png(fig)

    # layer maps: one figure per size, one panel per checkpoint
    for z, m in enumerate(models):
        fig, axes = plt.subplots(1, len(steps), figsize=(0.45 * len(layers[z]) * len(steps) + 3,
                                                         0.22 * len(concepts) + 2), dpi=110, squeeze=False)
        for j, s in enumerate(steps):
            mat = np.full((len(concepts), len(layers[z])), np.nan)
            p = np.zeros_like(mat, dtype=bool)
            for i, c in enumerate(concepts):
                for q, l in enumerate(layers[z]):
                    mat[i, q] = val.get((z, s, l, c), np.nan)
                    p[i, q] = (m, s, l, c) in pres
            im = _heat(axes[0, j], mat, [str(l) for l in layers[z]], concepts, f"step {s}", vmin, p, show_y=j == 0)
            axes[0, j].set_xlabel("layer", fontsize=8)
        fig.colorbar(im, ax=axes[0, -1], label=label)
        fig.suptitle(f"Layer maps, {m} (dot: present)", fontsize=10)
        out[f"layer_maps_{m}.png"] = _png(fig)

    # scale curves: best over layers, concept x size, at the late checkpoints
    late = steps[-3:] if len(steps) > 3 else steps[1:] or steps
    fig, axes = plt.subplots(1, len(late), figsize=(2.6 * len(late) + 2.5, 0.22 * len(concepts) + 2), dpi=110,
                             squeeze=False)
    for j, s in enumerate(late):
        mat, p = best_over_layers([(z, s) for z in range(len(models))])
        im = _heat(axes[0, j], mat, models, concepts, f"step {s}", vmin, p, show_y=j == 0)
    fig.colorbar(im, ax=axes[0, -1], label=f"best layer's {label}")
    fig.suptitle("Scale: concept x model size (dot: present)", fontsize=10)
    out["scale_curves.png"] = _png(fig)

    # behaviour beside the emergence of the concepts it serves
    if summary.get("behaviour"):
        beh = summary["behaviour"]
        fig, axes = plt.subplots(1, len(beh), figsize=(5.2 * len(beh), 3.6), dpi=110, squeeze=False)
        x = {s: i for i, s in enumerate(steps)}
        for j, (b, per_model) in enumerate(sorted(beh.items())):
            ax = axes[0, j]
            for q, r in enumerate(per_model):
                colour = plt.get_cmap("tab10")(q)
                acc = [r["accuracy"].get(str(s)) for s in steps]
                ax.plot(range(len(steps)), [a if a is not None else np.nan for a in acc], "-o", color=colour,
                        label=f"{r['model']} accuracy", markersize=3)
                es = [e for e in r["concepts"].values() if e is not None]
                if es:
                    ax.axvline(x[min(es)], color=colour, linestyle=":", linewidth=1.2)
            ax.axhline(st["behaviour_threshold"], color="grey", linewidth=0.6)
            ax.set_xticks(range(len(steps)))
            ax.set_xticklabels([str(s) for s in steps], rotation=90, fontsize=7)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("checkpoint (step)")
            ax.set_title(f"{b}: held-out accuracy; dotted: first of its concepts to emerge", fontsize=8)
            ax.legend(fontsize=7)
        out["behaviour.png"] = _png(fig)
    return out
