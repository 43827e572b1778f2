// saeray report: sortable tables. Any <table class="sortable"> sorts on a header click, numbers
// as numbers (a cell's data-v, else its text), blanks last; a second click reverses.
(function () {
  "use strict";
  function key(td) {
    if (!td) return null;
    var raw = td.hasAttribute("data-v") ? td.getAttribute("data-v") : td.textContent;
    var s = raw.replace(/[,\u00a0%]/g, "").trim();
    if (s === "" || s === "\u2013" || s === "-") return null;
    var n = Number(s);
    return isNaN(n) ? s.toLowerCase() : n;
  }
  function sortBy(table, col, th) {
    var body = table.tBodies[0];
    if (!body) return;
    var dir = th.getAttribute("aria-sort") === "descending" ? 1 : -1;
    var first = th.getAttribute("aria-sort") === null;
    var rows = Array.prototype.slice.call(body.rows);
    var keys = rows.map(function (r) { return key(r.cells[col]); });
    var numeric = keys.every(function (k) { return k === null || typeof k === "number"; });
    if (first) dir = numeric ? -1 : 1;     // numbers largest first, text A to Z
    var idx = rows.map(function (_, i) { return i; });
    idx.sort(function (a, b) {
      var x = keys[a], y = keys[b];
      if (x === null && y === null) return a - b;
      if (x === null) return 1;
      if (y === null) return -1;
      if (typeof x !== typeof y) { x = String(x); y = String(y); }
      return (x < y ? -1 : x > y ? 1 : a - b) * dir;
    });
    idx.forEach(function (i) { body.appendChild(rows[i]); });
    Array.prototype.forEach.call(th.parentNode.cells, function (c) { c.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
  }
  function init(root) {
    Array.prototype.forEach.call((root || document).querySelectorAll("table.sortable"), function (t) {
      if (!t.tHead || t.getAttribute("data-sortable") === "1") return;
      t.setAttribute("data-sortable", "1");
      var row = t.tHead.rows[t.tHead.rows.length - 1];
      Array.prototype.forEach.call(row.cells, function (th, i) {
        th.title = "sort";
        th.addEventListener("click", function () { sortBy(t, i, th); });
      });
    });
  }
  window.saerayInitSort = init;
  document.addEventListener("DOMContentLoaded", function () { init(document); });
})();
