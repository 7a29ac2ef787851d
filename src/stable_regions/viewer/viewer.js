// stable-regions viewer: tokens coloured by radius (log scale), a tooltip per token, and the
// radius along the text. Everything it needs is in this page: no network.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("sr-data").textContent);
  var PALETTE = [[215, 25, 28], [253, 174, 97], [255, 255, 191], [166, 217, 106], [26, 150, 65]];
  var LINES = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];
  var state = { eps: 0, radius: data.radius_columns[0], pinned: null };
  var tip = document.getElementById("tip");

  function num(x) {
    if (x === null || x === undefined) return "–";
    if (x === "inf") return "∞";
    if (x === "-inf") return "−∞";
    if (typeof x === "string") return JSON.stringify(x);
    if (typeof x !== "number") return String(x);
    if (Number.isInteger(x) && Math.abs(x) < 1e6) return String(x);
    var a = Math.abs(x);
    return a >= 1e4 || a < 1e-3 ? x.toExponential(3) : x.toPrecision(4);
  }
  function finite(x) { return typeof x === "number" && isFinite(x) && x > 0; }
  function radiusOf(t) { var r = t.radius[state.radius]; return r ? r[state.eps] : null; }
  function range() {
    var lo = Infinity, hi = -Infinity;
    data.groups.forEach(function (g) { g.tokens.forEach(function (t) {
      var r = radiusOf(t); if (finite(r)) { lo = Math.min(lo, r); hi = Math.max(hi, r); }
    }); });
    if (!isFinite(lo)) { lo = 1; hi = 1; }
    if (hi <= lo) { hi = lo * 1.0001; }
    return [lo, hi];
  }
  function colour(frac) {
    frac = Math.max(0, Math.min(1, frac)) * (PALETTE.length - 1);
    var i = Math.min(PALETTE.length - 2, Math.floor(frac)), f = frac - i;
    var c = PALETTE[i].map(function (v, k) { return Math.round(v + f * (PALETTE[i + 1][k] - v)); });
    return "rgb(" + c.join(",") + ")";
  }
  function position(r, lr) { return (Math.log(r) - Math.log(lr[0])) / (Math.log(lr[1]) - Math.log(lr[0])); }

  // whitespace made visible: a space is a dot, a tab an arrow, a newline a return sign
  function visible(text, into) {
    var plain = "";
    function flush() { if (plain) { into.appendChild(document.createTextNode(plain)); plain = ""; } }
    for (var i = 0; i < text.length; i++) {
      var ch = text[i], mark = ch === " " ? "·" : ch === "\t" ? "→" : ch === "\n" ? "↵" : null;
      if (mark === null) { plain += ch; continue; }
      flush();
      var s = document.createElement("span"); s.className = "ws"; s.textContent = mark;
      into.appendChild(s);
      if (ch === "\n") into.appendChild(document.createElement("br"));
    }
    flush();
  }

  function tooltip(t) {
    var rows = [];
    rows.push("<div class='head'></div><table>");
    data.radius_columns.forEach(function (c) {
      rows.push("<tr><td class='k'>" + c + " (eps " + data.eps[state.eps] + ")</td><td class='v' data-key='" + c + "'>" + num(t.radius[c][state.eps]) + "</td></tr>");
    });
    Object.keys(t.values).forEach(function (k) {
      rows.push("<tr><td class='k'>" + k + "</td><td class='v' data-key='" + k + "'>" + num(t.values[k]) + "</td></tr>");
    });
    rows.push("</table>");
    if (t.alternatives && t.alternatives.length) {
      rows.push("<div class='alts'>" + data.alternatives_label + ":<table>");
      t.alternatives.forEach(function (a) {
        rows.push("<tr><td class='k alt'></td><td class='v'>" + num(a[1]) + "</td></tr>");
      });
      rows.push("</table></div>");
    }
    tip.innerHTML = rows.join("");
    tip.querySelector(".head").textContent = JSON.stringify(t.text);
    var alts = tip.querySelectorAll(".alt");
    (t.alternatives || []).forEach(function (a, i) { alts[i].textContent = JSON.stringify(a[0]); });
  }
  function show(span, t) {
    tooltip(t);
    tip.style.display = "block";
    var box = span.getBoundingClientRect();
    tip.style.left = (window.scrollX + box.left) + "px";
    tip.style.top = (window.scrollY + box.bottom + 6) + "px";
  }
  function hide() { if (state.pinned === null) tip.style.display = "none"; }

  function render() {
    var lr = range();
    var root = document.getElementById("groups");
    root.innerHTML = "";
    data.groups.forEach(function (g, gi) {
      var box = document.createElement("div"); box.className = "group";
      if (data.groups.length > 1 || g.name) {
        var h = document.createElement("h2"); h.textContent = g.name; box.appendChild(h);
      }
      var text = document.createElement("div"); text.className = "text";
      if (g.prefix) { var pre = document.createElement("span"); pre.className = "prefix"; visible(g.prefix, pre); text.appendChild(pre); }
      g.tokens.forEach(function (t, ti) {
        var s = document.createElement("span"); s.className = "tok";
        s.dataset.group = gi; s.dataset.index = ti;
        var r = radiusOf(t);
        if (finite(r)) s.style.background = colour(position(r, lr)); else s.classList.add("none");
        visible(t.text, s);
        s.addEventListener("mouseenter", function () { if (state.pinned === null) show(s, t); });
        s.addEventListener("mouseleave", hide);
        s.addEventListener("click", function (ev) {
          ev.stopPropagation();
          document.querySelectorAll(".tok.active").forEach(function (x) { x.classList.remove("active"); });
          state.pinned = s; s.classList.add("active"); tip.classList.add("pinned"); show(s, t);
        });
        text.appendChild(s);
      });
      box.appendChild(text);
      root.appendChild(box);
    });
    legend(lr);
    plot(lr);
  }

  function legend(lr) {
    var bar = document.getElementById("legend-bar");
    var stops = [];
    for (var i = 0; i <= 10; i++) stops.push(colour(i / 10) + " " + (i * 10) + "%");
    bar.style.background = "linear-gradient(to right," + stops.join(",") + ")";
    var mid = Math.sqrt(lr[0] * lr[1]);
    document.getElementById("legend-ticks").innerHTML =
      "<span>" + num(lr[0]) + "</span><span>" + num(mid) + "</span><span>" + num(lr[1]) + "</span>";
    document.getElementById("legend-label").textContent =
      state.radius + " at eps " + data.eps[state.eps] + " (log scale; red: fragile)";
  }

  function plot(lr) {
    var svg = document.getElementById("plot");
    var W = svg.clientWidth || 1000, H = 180, L = 56, R = 10, T = 10, B = 26;
    var n = 1;
    data.groups.forEach(function (g) { n = Math.max(n, g.tokens.length); });
    var ns = "http://www.w3.org/2000/svg";
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    function el(name, attrs, text) {
      var e = document.createElementNS(ns, name);
      Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
      if (text !== undefined) e.textContent = text;
      svg.appendChild(e); return e;
    }
    function x(i) { return L + (n > 1 ? i / (n - 1) : 0.5) * (W - L - R); }
    function y(r) { return T + (1 - position(r, lr)) * (H - T - B); }
    el("line", { x1: L, y1: T, x2: L, y2: H - B, "class": "axis" });
    el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, "class": "axis" });
    el("text", { x: 4, y: T + 10 }, num(lr[1]));
    el("text", { x: 4, y: H - B }, num(lr[0]));
    el("text", { x: L, y: H - 6 }, "token 0");
    el("text", { x: W - R - 60, y: H - 6 }, "token " + (n - 1));
    data.groups.forEach(function (g, gi) {
      var pts = [];
      g.tokens.forEach(function (t, i) { var r = radiusOf(t); if (finite(r)) pts.push([x(i), y(r), i]); });
      var colourOf = LINES[gi % LINES.length];
      el("polyline", { points: pts.map(function (p) { return p[0] + "," + p[1]; }).join(" "), "class": "line", stroke: colourOf });
      pts.forEach(function (p) {
        var c = el("circle", { cx: p[0], cy: p[1], r: 2.5, fill: colourOf });
        var t = g.tokens[p[2]];
        var title = document.createElementNS(ns, "title");
        title.textContent = JSON.stringify(t.text) + ": " + num(radiusOf(t));
        c.appendChild(title);
        c.addEventListener("click", function (ev) {
          ev.stopPropagation();
          var span = document.querySelector(".tok[data-group='" + gi + "'][data-index='" + p[2] + "']");
          if (span) { span.scrollIntoView({ block: "center" }); span.click(); }
        });
      });
    });
  }

  var epsSelect = document.getElementById("eps");
  data.eps.forEach(function (e, i) { var o = document.createElement("option"); o.value = i; o.textContent = e; epsSelect.appendChild(o); });
  epsSelect.addEventListener("change", function () { state.eps = +epsSelect.value; render(); });
  var radiusSelect = document.getElementById("radius");
  data.radius_columns.forEach(function (c) { var o = document.createElement("option"); o.value = c; o.textContent = c; radiusSelect.appendChild(o); });
  radiusSelect.addEventListener("change", function () { state.radius = radiusSelect.value; render(); });
  document.addEventListener("click", function () {
    state.pinned = null; tip.classList.remove("pinned"); tip.style.display = "none";
    document.querySelectorAll(".tok.active").forEach(function (x) { x.classList.remove("active"); });
  });
  window.addEventListener("resize", function () { plot(range()); });
  render();
})();
