// saeray feature dashboard: renders one SAE's latents from window.SAERAY_DASH (written beside the
// page as <sae>.js in SAEDashboard's feature layout). Everything from the model or the corpus is
// put on the page with textContent, never as markup.
(function () {
  "use strict";
  var D = window.SAERAY_DASH;
  var byIndex = {};
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function num(v, d) {
    if (v === null || v === undefined || (typeof v === "number" && isNaN(v))) return "\u2013";
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
    return String(Number(v.toPrecision(d || 3)));
  }
  function pct(v) { return num(100 * v, 3) + "%"; }
  function showTok(s) { return s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }
  function concepts(f) {
    var c = (f.saeray || {}).concepts || [];
    return c.map(function (x) { return x.concept; }).join(", ");
  }
  function searchable(f) {
    var x = f.saeray || {};
    return concepts(f) + " " + (x.explanation || "");
  }

  function hist(values, heights, w, h, label) {
    var ns = "http://www.w3.org/2000/svg";
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", "hist"); svg.setAttribute("width", w); svg.setAttribute("height", h);
    svg.setAttribute("role", "img"); svg.setAttribute("aria-label", label);
    if (!heights || !heights.length) return svg;
    var max = Math.max.apply(null, heights) || 1, bw = (w - 10) / heights.length;
    heights.forEach(function (v, i) {
      var r = document.createElementNS(ns, "rect"), bh = (h - 22) * v / max;
      r.setAttribute("x", 5 + i * bw); r.setAttribute("y", h - 16 - bh);
      r.setAttribute("width", Math.max(bw - 1, 1)); r.setAttribute("height", bh); r.setAttribute("fill", "#4f6fb0");
      var t = document.createElementNS(ns, "title"); t.textContent = num(values[i]) + ": " + v; r.appendChild(t);
      svg.appendChild(r);
    });
    [[0, "start"], [values.length - 1, "end"]].forEach(function (p) {
      var t = document.createElementNS(ns, "text");
      t.setAttribute("x", p[1] === "start" ? 4 : w - 4); t.setAttribute("y", h - 3);
      t.setAttribute("text-anchor", p[1]); t.setAttribute("font-size", "10"); t.textContent = num(values[p[0]]);
      svg.appendChild(t);
    });
    return svg;
  }

  function context(a, max) {
    var p = el("div", { "class": "ctx" });
    a.tokens.forEach(function (tok, i) {
      var v = a.values[i] || 0, s = el("span", { "class": "t" + (i === a.qualifying_token_index ? " q" : "") }, showTok(tok));
      if (v > 0 && max > 0) s.style.background = "rgba(255,140,0," + Math.min(1, 0.12 + 0.88 * v / max).toFixed(3) + ")";
      s.title = showTok(tok) + ": " + num(v, 4);
      p.appendChild(s);
    });
    return p;
  }

  function lens(title, strs, vals) {
    var box = el("div");
    box.appendChild(el("h3", null, title));
    if (!strs || !strs.length) { box.appendChild(el("p", { "class": "muted" }, "no unembedding at this hook point")); return box; }
    var t = el("table"), b = el("tbody");
    strs.forEach(function (s, i) {
      var tr = el("tr"); tr.appendChild(el("td", { "class": "l" }, showTok(s))); tr.appendChild(el("td", null, num(vals[i])));
      b.appendChild(tr);
    });
    t.appendChild(b); box.appendChild(t);
    return box;
  }

  function fact(t, k, v) {
    var tr = el("tr"); tr.appendChild(el("th", { "class": "l" }, k));
    var td = el("td"); if (v instanceof Node) td.appendChild(v); else td.textContent = v;
    tr.appendChild(td); t.appendChild(tr);
  }

  function render(f) {
    var box = document.getElementById("feature");
    box.textContent = "";
    var x = f.saeray || {};
    var h = el("h2", null, "Latent " + f.feature_index + " ");
    (x.groups || []).forEach(function (g) { h.appendChild(el("span", { "class": "badge" }, g)); });
    box.appendChild(h);
    var facts = el("table", { "class": "facts" }), tb = el("tbody");
    fact(tb, "fires on", (x.n_fired || 0) + " of " + D.tokens + " tokens (" + pct(f.frac_nonzero) + ")");
    fact(tb, "max activation", num(x.max_act, 4));
    if (x.concepts) fact(tb, "planted concept", x.concepts.map(function (c) {
      return c.concept + " (best latent: F1 " + num(c.f1, 2) + ", AUROC " + num(c.auroc, 3) + ")"; }).join("; "));
    if (x.influence) fact(tb, "GradSAE influence", "mean |score| " + num(x.influence.gradsae) + ", mean |exact effect| " +
      num(x.influence.exact) + ", rank " + x.influence.rank + " (sweep " + x.influence.sweep + ", " + x.influence.prompts + " prompts)");
    if (x.explanation) fact(tb, "explanation" + (x.explainer ? " (" + x.explainer + ")" : ""), x.explanation);
    var nb = el("span");
    (x.neighbours || []).forEach(function (j, i) {
      var label = j + " (" + num(x.neighbour_cos[i], 2) + ")";
      var node = byIndex[j] ? el("a", { href: "#" + j }, label) : el("span", null, label);
      nb.appendChild(node); nb.appendChild(document.createTextNode(" "));
    });
    fact(tb, "nearest latents (decoder cosine)", nb);
    facts.appendChild(tb); box.appendChild(facts);

    var cols = el("div", { "class": "cols" });
    var d1 = el("div"); d1.appendChild(el("h3", null, "Activation density")); d1.appendChild(hist(f.freq_hist_data_bar_values, f.freq_hist_data_bar_heights, 300, 110, "activation histogram"));
    var d2 = el("div"); d2.appendChild(el("h3", null, "Logit-lens histogram")); d2.appendChild(hist(f.logits_hist_data_bar_values, f.logits_hist_data_bar_heights, 300, 110, "logit histogram"));
    cols.appendChild(d1); cols.appendChild(d2);
    cols.appendChild(lens("Promoted tokens", f.pos_str, f.pos_values));
    cols.appendChild(lens("Suppressed tokens", f.neg_str, f.neg_values));
    box.appendChild(cols);

    var ctx = el("div", { id: "contexts" });
    ctx.appendChild(el("h3", null, "Activating contexts"));
    if (!f.activations.length) ctx.appendChild(el("p", { "class": "muted" }, "never fired on the dashboard tokens"));
    var last = null, max = x.max_act || 0;
    f.activations.forEach(function (a) {
      var g = a.bin_contains < 0 ? "Top activations" : "Interval " + num(a.bin_min) + " \u2013 " + num(a.bin_max) + ", contains " + pct(a.bin_contains) + " of firings";
      if (g !== last) { ctx.appendChild(el("div", { "class": "group" }, g)); last = g; }
      ctx.appendChild(context(a, max));
    });
    box.appendChild(ctx);
    Array.prototype.forEach.call(document.querySelectorAll("#latents tbody tr"), function (tr) {
      tr.className = Number(tr.getAttribute("data-latent")) === f.feature_index ? "sel" : "";
    });
  }

  function list() {
    var t = document.getElementById("latents"), b = t.tBodies[0];
    D.features.forEach(function (f) {
      var x = f.saeray || {};
      var tr = el("tr", { "data-latent": f.feature_index, "data-groups": (x.groups || []).join(" "), "data-text": searchable(f) });
      tr.appendChild(el("td", null, f.feature_index));
      tr.appendChild(el("td", { "class": "w" }, (x.groups || []).join(", ")));
      var d = el("td", { "data-v": f.frac_nonzero }, pct(f.frac_nonzero)); tr.appendChild(d);
      tr.appendChild(el("td", null, num(x.max_act)));
      tr.appendChild(el("td", { "class": "w" }, concepts(f)));
      tr.appendChild(el("td", x.influence ? { "data-v": x.influence.rank } : null, x.influence ? x.influence.rank : "\u2013"));
      tr.addEventListener("click", function () { location.hash = "#" + f.feature_index; });
      b.appendChild(tr);
    });
    var groups = {};
    D.features.forEach(function (f) { ((f.saeray || {}).groups || []).forEach(function (g) { groups[g] = 1; }); });
    var sel = document.getElementById("group");
    Object.keys(groups).forEach(function (g) { sel.appendChild(el("option", { value: g }, g)); });
    function filter() {
      var g = sel.value, q = document.getElementById("search").value.toLowerCase();
      Array.prototype.forEach.call(b.rows, function (tr) {
        var ok = (!g || (" " + tr.getAttribute("data-groups") + " ").indexOf(" " + g + " ") >= 0) &&
          (!q || tr.getAttribute("data-latent") === q || tr.getAttribute("data-text").toLowerCase().indexOf(q) >= 0);
        tr.style.display = ok ? "" : "none";
      });
    }
    sel.addEventListener("change", filter);
    document.getElementById("search").addEventListener("input", filter);
    if (window.saerayInitSort) window.saerayInitSort(t.parentNode);
  }

  function route() {
    var want = Number(location.hash.slice(1));
    var f = (location.hash.length > 1 && byIndex[want]) || D.features[0];
    if (f) render(f);
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (!D) { document.getElementById("feature").textContent = "dashboard data missing"; return; }
    D.features.forEach(function (f) { byIndex[f.feature_index] = f; });
    list();
    window.addEventListener("hashchange", route);
    route();
  });
})();
