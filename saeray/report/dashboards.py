"""A feature dashboard page per SAE: ``report/dashboards/<target>/<hookpoint>/<sae>.html`` and its
data beside it (``<sae>.js``, SAEDashboard's feature dicts as the dashboards stage wrote them,
fields the page does not show left out). The page is rendered in the browser by
``assets/dashboard.js``, which puts every model- and corpus-derived string on the page as text.

Data travels as a script, not fetched JSON: browsers refuse ``fetch`` of ``file://`` URLs, and a
report must open from a folder copied off object storage."""
from __future__ import annotations

import html
import json
from collections import Counter

from .page import NavLink, page

DROP = ("correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
        "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
        "decoder_weights_dist", "n_prompts_total", "n_tokens_in_prompt", "dataset")


def href(folder: str, hp: str, sae: str) -> str:
    """The page's path relative to the report folder; ``folder``: the target's run folder name."""
    return f"dashboards/{folder}/{hp}/{sae}.html"


def data_js(meta: dict, features: list[dict]) -> bytes:
    feats = [{k: v for k, v in f.items() if k not in DROP} for f in features]
    body = json.dumps({**meta, "features": feats}, ensure_ascii=True, separators=(",", ":"))
    # ensure_ascii leaves no raw U+2028/9; "</" cannot end a script that is a file, but costs nothing
    return ("window.SAERAY_DASH = " + body.replace("</", "<\\/") + ";\n").encode()


def groups_line(groups) -> str:
    """"random 64, frequent 64, ..." from each shown latent's list of groups."""
    c = Counter(g for gs in groups for g in gs)
    return ", ".join(f"{g} {n}" for g, n in c.items())


def render(run: str, nav: list[NavLink], target: str, hp: str, sae: str, width: int, tokens: int,
           features: list[dict]) -> tuple[str, bytes]:
    """(page, data script) of one SAE's dashboard."""
    shown = len(features)
    meta = {"run": run, "target": target, "hookpoint": hp, "sae": sae, "width": width, "tokens": tokens}
    what = ("every latent" if shown == width else
            f"{shown} of {width} latents: "
            f"{html.escape(groups_line(f.get('saeray', {}).get('groups', []) for f in features))}")
    body = (f"<h1>{html.escape(sae)} · {html.escape(hp)} · {html.escape(target)}</h1>"
            f"<p class=muted>{what}; computed on {tokens:,} harvested tokens. Click a latent, or link to one "
            "with #index. Contexts: the token's shading is its activation over the latent's maximum; the outlined "
            "token is the one the context was chosen for.</p>"
            "<div class=dash><div><div class=filters><select id=group aria-label=group><option value=''>all groups"
            "</option></select><input id=search type=search placeholder='latent, concept or label' aria-label=search></div>"
            "<div class=list><table id=latents class=sortable><thead><tr><th>latent</th><th class=l>groups</th>"
            "<th>density</th><th>max</th><th class=l>concept</th><th title='rank by mean GradSAE score'>influence</th>"
            "</tr></thead><tbody></tbody>"
            "</table></div></div><div id=feature class=feature></div></div>")
    out = page(f"{sae} {hp} — {run}", body, run, nav, here="", depth=3,
               scripts=(f"{sae}.js", "../../../assets/dashboard.js"))
    return out, data_js(meta, features)
