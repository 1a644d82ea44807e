// tunefleet dashboard: draw the charts on load and after every htmx swap (the live fragments
// re-render them), and keep a followed log scrolled to its end.
(function () {
  "use strict";
  function draw() {
    if (window.tfCharts && window.uPlot) { window.tfCharts.drawAll(); }
  }
  function follow() {
    document.querySelectorAll("pre.log").forEach(function (el) { el.scrollTop = el.scrollHeight; });
  }
  document.addEventListener("DOMContentLoaded", function () { draw(); follow(); });
  document.addEventListener("htmx:afterSwap", function () { draw(); follow(); });
})();
