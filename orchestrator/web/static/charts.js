/* tunefleet charts: line charts drawn with uPlot (vendor/uPlot.iife.min.js + vendor/uPlot.min.css).
 *
 * Markup convention: one element per chart, the spec as JSON in a data-spec attribute
 * (HTML-escaped, as any attribute value):
 *
 *   <div class="tf-chart" data-spec='{"x": {"kind": "time"}, "y": {"kind": "usd", "label": "USD"},
 *        "series": [{"label": "spend", "points": [[1764500000, 1.5], [1764503600, 2.25]], "step": true}],
 *        "hlines": [{"label": "monthly budget", "y": 50}]}'></div>
 *
 * tfCharts.drawAll(root?) draws every not-yet-drawn div.tf-chart[data-spec] under root (default:
 * document); it runs once by itself when the document is ready. Call it again after inserting
 * HTML (e.g. on htmx:afterSwap): it also destroys the charts whose elements left the page (uPlot
 * listens on window, so a swapped-out chart would otherwise live on). tfCharts.draw(el, spec)
 * draws one spec into el, replacing the chart already there, and returns the uPlot instance (null
 * when there is nothing to draw); tfCharts.destroy(el) removes one.
 *
 * The spec:
 *   title     optional; drawn above the plot (leave it out when the page has its own heading)
 *   x.kind    "time":  x is unix seconds, ticks and legend are clock times in UTC (x.tz: "local"
 *                      for the browser's time zone)
 *             "step":  x is a training step (whole numbers)
 *             "hours": x is a duration in hours, shown as 45m, 3h 30m, 2d 4h
 *   x.label   optional axis title (defaults: "time (UTC)" / "time" for local, "step", "duration")
 *   y.kind    "usd" (dollars, decimals by magnitude: $0.000076, $12.50, $1,234.50; axis from 0),
 *             "loss" (3 significant digits), "count" (whole numbers, axis from 0)
 *   y.label   optional axis title
 *   series    [{label, points: [[x, y], ...], dashed?: bool, step?: bool}]; every series goes
 *             onto one shared x axis (each series is null where it has no point; lines span the
 *             gaps); a repeated x keeps its last y; step draws a staircase (a value holds until
 *             the next point)
 *   hlines    [{label, y}]: horizontal reference lines (budgets), dashed, named in the legend and
 *             at the line's right end
 *   height    optional plot height in px (default: by width, 200 to 300)
 *
 * The chart takes its container's width and follows it (ResizeObserver). The formatting helpers
 * are on tfCharts.fmt, and the alignment on tfCharts.align, so they can be checked without a
 * browser (module.exports under node).
 */
(function (root) {
  "use strict";

  var PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                 "#bcbd22", "#7f7f7f", "#d62728"];
  var HLINE_COLORS = ["#d62728", "#555555", "#8c564b", "#e377c2", "#bcbd22"];
  var MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

  // ------------------------------------------------------------------ formatting

  function group(intStr) {  // "1234567" -> "1,234,567" (no locale: the same everywhere)
    return intStr.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  }

  function fixed(v, decimals) {  // v.toFixed with thousands separators, no "-0"
    var s = Math.abs(v).toFixed(decimals), neg = v < 0 && Number(s) !== 0;
    var dot = s.indexOf(".");
    var whole = dot < 0 ? s : s.slice(0, dot), frac = dot < 0 ? "" : s.slice(dot);
    return (neg ? "-" : "") + group(whole) + frac;
  }

  function decimalsOf(incr) {  // how many decimals a tick increment needs: 0.00002 -> 5, 2.5 -> 1, 500 -> 0
    incr = Math.abs(incr);
    for (var d = 0; d < 12; d++) {
      var scaled = incr * Math.pow(10, d);
      if (Math.abs(scaled - Math.round(scaled)) < 1e-6 * Math.max(1, scaled)) return d;
    }
    return 12;
  }

  function usd(v, decimals) {
    if (v == null || !isFinite(v)) return "\u2013";
    var a = Math.abs(v);
    if (decimals == null)  // cents from $1 up; below, two significant digits
      decimals = a >= 1 || a === 0 ? 2 : Math.min(10, Math.max(2, 1 - Math.floor(Math.log10(a))));
    var s = fixed(a, decimals);
    return (v < 0 && Number(a.toFixed(decimals)) !== 0 ? "-$" : "$") + s;
  }

  function usdTicks(splits, incr) {  // one precision for the whole axis, from the tick spacing
    var d = decimalsOf(incr);
    if (d > 0) d = Math.max(d, 2);
    return splits.map(function (v) { return v == null ? "" : v === 0 ? "$0" : usd(v, d); });
  }

  function loss(v) {
    if (v == null || !isFinite(v)) return "\u2013";
    if (v === 0) return "0";
    if (Math.abs(v) >= 1000) return fixed(v, 0);
    return v.toPrecision(3);
  }

  function lossTicks(splits, incr) {  // 3 significant digits, more when the spacing needs them
    var labels = splits.map(function (v) { return v == null ? "" : loss(v); });
    var seen = {}, clash = labels.some(function (s) { var c = seen[s]; seen[s] = true; return c; });
    if (!clash) return labels;
    var d = decimalsOf(incr);
    return splits.map(function (v) { return v == null ? "" : fixed(v, d); });
  }

  function count(v) {
    if (v == null || !isFinite(v)) return "\u2013";
    return Number.isInteger(v) ? fixed(v, 0) : fixed(v, 2).replace(/\.?0+$/, "");
  }

  function duration(hours) {  // 0.75 -> "45m", 3.5 -> "3h 30m", 52 -> "2d 4h"
    if (hours == null || !isFinite(hours)) return "\u2013";
    var sign = hours < 0 ? "-" : "", m = Math.round(Math.abs(hours) * 60);
    if (m < 60) return sign + m + "m";
    var h = Math.floor(m / 60), mm = m % 60;
    if (h < 48) return sign + h + "h" + (mm ? " " + mm + "m" : "");
    var d = Math.floor(h / 24), hh = h % 24;
    return sign + d + "d" + (hh ? " " + hh + "h" : "");
  }

  function pad2(n) { return (n < 10 ? "0" : "") + n; }

  function parts(ts, utc) {  // unix seconds -> calendar fields, in UTC or the local time zone
    var d = new Date(ts * 1000);
    return utc ? {Y: d.getUTCFullYear(), M: d.getUTCMonth(), D: d.getUTCDate(), h: d.getUTCHours(),
                  m: d.getUTCMinutes(), s: d.getUTCSeconds()}
               : {Y: d.getFullYear(), M: d.getMonth(), D: d.getDate(), h: d.getHours(),
                  m: d.getMinutes(), s: d.getSeconds()};
  }

  function time(ts, utc) {  // the legend's value: "2026-11-30 14:05:07 UTC"
    if (ts == null || !isFinite(ts)) return "\u2013";
    var p = parts(ts, utc);
    return p.Y + "-" + pad2(p.M + 1) + "-" + pad2(p.D) + " " + pad2(p.h) + ":" + pad2(p.m) + ":" + pad2(p.s) +
      (utc ? " UTC" : "");
  }

  function timeTicks(splits, incr, utc) {
    // 24-hour clock times; the date under the first tick and wherever the day changes.
    // Ticks a day or more apart: "Nov 30" (the year under the first and at a new year).
    var prev = null;
    return splits.map(function (ts) {
      if (ts == null) return "";
      var p = parts(ts, utc), day = MONTHS[p.M] + " " + p.D, label;
      if (incr >= 28 * 86400) label = MONTHS[p.M] + " " + p.Y;
      else if (incr >= 86400) label = day + (prev == null || prev.Y !== p.Y ? "\n" + p.Y : "");
      else {
        label = pad2(p.h) + ":" + pad2(p.m) + (incr < 60 ? ":" + pad2(p.s) : "");
        if (prev == null || prev.D !== p.D || prev.M !== p.M || prev.Y !== p.Y) label += "\n" + day;
      }
      prev = p;
      return label;
    });
  }

  function stepTicks(splits) {
    return splits.map(function (v) { return v == null ? "" : fixed(v, Number.isInteger(v) ? 0 : 1); });
  }

  // ------------------------------------------------------------------ data

  function align(series, hlines) {
    // [xs, ys of each series..., ys of each hline...]: xs sorted and unique over every series;
    // a series is null where it has no point; a repeated x keeps the series' last y there.
    var xset = {}, xs = [];
    var maps = (series || []).map(function (s) {
      var m = new Map();
      (s.points || []).forEach(function (p) {
        var x = Number(p[0]), y = p[1] == null ? null : Number(p[1]);
        if (!isFinite(x)) return;
        m.set(x, y != null && isFinite(y) ? y : null);
        if (!xset[x]) { xset[x] = true; xs.push(x); }
      });
      return m;
    });
    xs.sort(function (a, b) { return a - b; });
    var out = [xs];
    maps.forEach(function (m) {
      out.push(xs.map(function (x) { return m.has(x) ? m.get(x) : null; }));
    });
    (hlines || []).forEach(function (h) {
      out.push(xs.map(function () { return Number(h.y); }));
    });
    return out;
  }

  var X = {
    time: {label: "time (UTC)", value: function (v, utc) { return time(v, utc); }},
    step: {label: "step", value: function (v) { return v == null ? "\u2013" : fixed(v, 0); }},
    hours: {label: "duration", value: duration},
  };
  var Y = {usd: {value: usd, ticks: usdTicks, zero: true},
           loss: {value: loss, ticks: lossTicks, zero: false},
           count: {value: count, ticks: function (splits) { return splits.map(function (v) { return v == null ? "" : count(v); }); },
                   zero: true}};

  function hoursIncrs() {
    return [1 / 60, 2 / 60, 5 / 60, 10 / 60, 15 / 60, 0.5, 1, 2, 3, 6, 12, 24, 48, 72, 168, 336, 720, 1440, 2160,
            4320, 8760];
  }

  function wholeIncrs() {
    var out = [];
    for (var e = 0; e < 12; e++) [1, 2, 5].forEach(function (m) { out.push(m * Math.pow(10, e)); });
    return out;
  }

  function axisSize(self, values, axisIdx, cycleNum) {  // wide enough for the longest tick label
    var axis = self.axes[axisIdx];
    if (cycleNum > 1) return axis._size;
    var size = axis.ticks.size + axis.gap, longest = "";
    (values || []).forEach(function (v) {
      String(v).split("\n").forEach(function (line) { if (line.length > longest.length) longest = line; });
    });
    if (longest) {
      self.ctx.font = axis.font[0];
      size += self.ctx.measureText(longest).width / (root.devicePixelRatio || 1);
    }
    return Math.ceil(size);
  }

  function heightFor(spec, width) {
    return spec.height || Math.round(Math.max(200, Math.min(300, width * 0.55)));
  }

  function options(spec, data, width) {
    var uPlot = root.uPlot;
    var xk = (spec.x && spec.x.kind) || "step", yk = (spec.y && spec.y.kind) || "loss";
    var utc = !(spec.x && spec.x.tz === "local");
    var xf = X[xk] || X.step, yf = Y[yk] || Y.loss;
    var series = spec.series || [], hlines = spec.hlines || [];
    var xs = data[0];
    var xLabel = (spec.x && spec.x.label) || (xk === "time" && !utc ? "time" : xf.label);
    var xAxis = {label: xLabel, space: xk === "time" ? 70 : 50};
    if (xk === "time") xAxis.values = function (u, splits, ai, space, incr) { return timeTicks(splits, incr, utc); };
    else if (xk === "hours") {
      xAxis.values = function (u, splits) { return splits.map(duration); };
      xAxis.incrs = hoursIncrs();
    } else {
      xAxis.values = function (u, splits) { return stepTicks(splits); };
      xAxis.incrs = wholeIncrs();
    }
    if (xk === "time") xAxis.size = 50;  // room for the date line
    var yAxis = {label: (spec.y && spec.y.label) || "", size: axisSize,
                 values: function (u, splits, ai, space, incr) { return yf.ticks(splits, incr); }};
    if (yk === "count") yAxis.incrs = wholeIncrs();

    var xScale = {time: xk === "time"};
    if (xs.length === 1) {  // a lone x: give the axis some width around it
      var half = xk === "time" ? 1800 : xk === "hours" ? 0.5 : 1;
      xScale.range = function () { return [xs[0] - half, xs[0] + half]; };
    }
    var yScale = {};
    if (yf.zero) {
      yScale.range = function (u, min, max) {
        var lo = Math.min(0, min == null ? 0 : min), hi = max == null ? 1 : max;
        if (hi <= lo) hi = lo + 1;
        return [lo, hi + (hi - lo) * 0.08];
      };
    }

    var useries = [{label: xLabel, value: function (u, v) { return xf.value(v, utc); }}];
    series.forEach(function (s, i) {
      var n = data[i + 1].filter(function (v) { return v != null; }).length;
      var o = {label: String(s.label == null ? "series " + (i + 1) : s.label),
               stroke: PALETTE[i % PALETTE.length], width: 1.6, spanGaps: true,
               value: function (u, v) { return yf.value(v); },
               points: {show: !s.step && n <= 60, size: 6}};
      if (s.dashed) o.dash = [6, 3];
      if (s.step) o.paths = uPlot.paths.stepped({align: 1});
      useries.push(o);
    });
    hlines.forEach(function (h, i) {
      useries.push({label: String(h.label), stroke: HLINE_COLORS[i % HLINE_COLORS.length], width: 1.2,
                    dash: [5, 4], points: {show: false}, value: function (u, v) { return yf.value(v); }});
    });

    var first = series.length + 1;
    function labelHlines(u) {  // each budget's name at the right end of its line
      var ctx = u.ctx, ratio = root.devicePixelRatio || 1;
      ctx.save();
      ctx.font = Math.round(11 * ratio) + "px system-ui, sans-serif";
      ctx.textAlign = "right";
      ctx.textBaseline = "bottom";
      hlines.forEach(function (h, i) {
        if (!u.series[first + i].show) return;
        var y = u.valToPos(Number(h.y), "y", true);
        ctx.fillStyle = HLINE_COLORS[i % HLINE_COLORS.length];
        ctx.fillText(String(h.label) + " " + yf.value(Number(h.y)), u.bbox.left + u.bbox.width - 4 * ratio,
                     y - 3 * ratio);
      });
      ctx.restore();
    }

    var opts = {
      width: width, height: heightFor(spec, width),
      scales: {x: xScale, y: yScale},
      axes: [xAxis, yAxis],
      series: useries,
      legend: {show: true, live: true},
      cursor: {points: {size: 6}},
      hooks: {draw: [labelHlines]},
    };
    if (xk === "time") opts.tzDate = utc ? function (ts) { return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"); }
                                         : function (ts) { return new Date(ts * 1e3); };
    if (spec.title) opts.title = String(spec.title);
    return opts;
  }

  // ------------------------------------------------------------------ drawing

  var live = [];  // the elements holding a chart, to destroy the ones that left the page

  function destroy(el) {
    var old = el._tfChart;
    if (old) {
      if (old.observer) old.observer.disconnect();
      if (old.plot) old.plot.destroy();
      el._tfChart = null;
    }
    var i = live.indexOf(el);
    if (i >= 0) live.splice(i, 1);
  }

  function draw(el, spec) {
    destroy(el);
    el.dataset.tfDrawn = "1";
    var data = align(spec.series, spec.hlines);
    if (!data[0].length) {
      el.textContent = "no data yet";
      el.className += " empty";
      return null;
    }
    if (!root.uPlot) {
      el.textContent = "charts need uPlot (vendor/uPlot.iife.min.js), which did not load";
      return null;
    }
    el.textContent = "";
    var width = Math.max(200, el.clientWidth || 600);
    var plot = new root.uPlot(options(spec, data, width), data, el);
    var state = {plot: plot, observer: null};
    if (root.ResizeObserver) {
      var pending = 0;
      state.observer = new root.ResizeObserver(function () {
        if (pending) return;
        pending = root.requestAnimationFrame(function () {
          pending = 0;
          var w = Math.max(200, el.clientWidth);
          if (w && w !== plot.width) plot.setSize({width: w, height: heightFor(spec, w)});
        });
      });
      state.observer.observe(el);
    }
    el._tfChart = state;
    live.push(el);
    return plot;
  }

  function drawAll(scope) {
    live.filter(function (el) { return !el.isConnected; }).forEach(destroy);
    var nodes = (scope || root.document).querySelectorAll("div.tf-chart[data-spec]");
    Array.prototype.forEach.call(nodes, function (el) {
      if (el.dataset.tfDrawn) return;
      try {
        draw(el, JSON.parse(el.dataset.spec));
      } catch (err) {
        el.textContent = "chart failed: " + err;
        if (root.console) root.console.error(err);
      }
    });
  }

  var tfCharts = {
    draw: draw, drawAll: drawAll, destroy: destroy, align: align,
    fmt: {usd: usd, usdTicks: usdTicks, loss: loss, lossTicks: lossTicks, count: count, duration: duration,
          time: time, timeTicks: timeTicks, decimalsOf: decimalsOf},
  };
  root.tfCharts = tfCharts;
  if (typeof module !== "undefined" && module.exports) module.exports = tfCharts;

  if (root.document) {
    if (root.document.readyState === "loading")
      root.document.addEventListener("DOMContentLoaded", function () { drawAll(); });
    else drawAll();
  }
})(typeof window !== "undefined" ? window : globalThis);
