// Draws each chart of the page with plotly.js from the figure in its data-plot attribute
// (server-built JSON): no inline script, as the server's Content-Security-Policy requires.
// Parts of a page loaded later (fragments.js) call window.consoleCharts.draw(part).
(function () {
  "use strict";
  function draw(root) {
    if (typeof Plotly === "undefined") { return; }
    (root || document).querySelectorAll("[data-plot]:not([data-drawn])").forEach(function (node) {
      var figure = JSON.parse(node.getAttribute("data-plot"));
      var layout = Object.assign({autosize: true, font: {family: "system-ui, sans-serif", size: 12},
                                  paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)"}, figure.layout || {});
      Plotly.newPlot(node, figure.data || [], layout, {responsive: true, displayModeBar: false});
      node.setAttribute("data-drawn", "true");
    });
  }
  window.consoleCharts = {draw: draw};
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", function () { draw(); }); }
  else { draw(); }
})();
