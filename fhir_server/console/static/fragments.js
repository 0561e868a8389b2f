// Parts of a page that take longer to compute (AI readiness over every graded image, statistics
// over every patient) are fetched after the page is shown, from the console's fragment routes;
// without scripts, each has a link to the same content as a page of its own.
(function () {
  "use strict";
  function load(node) {
    fetch(node.getAttribute("data-fragment"), {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (answer) {
        return answer.text().then(function (text) { return {ok: answer.ok, status: answer.status, text: text}; });
      })
      .then(function (result) {
        if (!result.ok && result.text.indexOf("data-fragment-body") < 0) {
          throw new Error("the server answered " + result.status);
        }
        node.innerHTML = result.text;
        node.setAttribute("data-loaded", "true");
        node.removeAttribute("aria-busy");
        if (window.consoleCharts) { window.consoleCharts.draw(node); }
      })
      .catch(function (error) {
        var message = document.createElement("p");
        message.className = "error";
        message.setAttribute("role", "alert");
        message.textContent = "This part could not be loaded: " + error.message + ". Reload the page to try again.";
        node.replaceChildren(message);
        node.setAttribute("data-loaded", "error");
        node.removeAttribute("aria-busy");
      });
  }
  function start() { document.querySelectorAll("[data-fragment]").forEach(load); }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();
