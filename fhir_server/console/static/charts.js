// Draws each chart of the page with plotly.js from the figure in its data-plot attribute
// (server-built JSON): no inline script, as the server's Content-Security-Policy requires.
(function () {
  "use strict";
  function draw() {
    if (typeof Plotly === "undefined") { return; }
    document.querySelectorAll("[data-plot]").forEach(function (node) {
      var figure = JSON.parse(node.getAttribute("data-plot"));
      var layout = Object.assign({autosize: true, font: {family: "system-ui, sans-serif", size: 12},
                                  paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)"}, figure.layout || {});
      Plotly.newPlot(node, figure.data || [], layout, {responsive: true, displaylogo: false,
                                                        modeBarButtonsToRemove: ["toImage"]});
      node.setAttribute("data-drawn", "true");
    });
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", draw); } else { draw(); }
})();
