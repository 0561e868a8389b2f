// The image viewer: zoom in and out (buttons, or + / - / 0 keys on the focused image), fit.
(function () {
  "use strict";
  var image = document.getElementById("view-image");
  var box = document.getElementById("viewer");
  var label = document.getElementById("zoom-level");
  if (!image || !box) { return; }
  var scale = 1;
  function fitScale() {
    if (!image.naturalWidth) { return 1; }
    return Math.min(box.clientWidth / image.naturalWidth, (window.innerHeight * 0.7) / image.naturalHeight, 4);
  }
  function show() {
    image.style.width = Math.round(image.naturalWidth * scale) + "px";
    image.style.height = Math.round(image.naturalHeight * scale) + "px";
    if (label) { label.textContent = Math.round(scale * 100) + " %"; }
  }
  function zoom(how) {
    if (how === "in") { scale = Math.min(scale * 1.25, 16); }
    else if (how === "out") { scale = Math.max(scale / 1.25, 0.05); }
    else if (how === "one") { scale = 1; }
    else { scale = fitScale(); }
    show();
  }
  document.querySelectorAll("[data-zoom]").forEach(function (button) {
    button.addEventListener("click", function () { zoom(button.getAttribute("data-zoom")); });
  });
  box.addEventListener("keydown", function (event) {
    if (event.key === "+" || event.key === "=") { zoom("in"); event.preventDefault(); }
    else if (event.key === "-") { zoom("out"); event.preventDefault(); }
    else if (event.key === "0") { zoom("fit"); event.preventDefault(); }
  });
  function failed() {
    var message = document.createElement("p");
    message.className = "error";
    message.setAttribute("role", "alert");
    message.id = "view-error";
    message.textContent = "This image cannot be shown: it does not exist, cannot be rendered, or the session " +
      "expired (reload the page).";
    box.replaceWith(message);
  }
  image.addEventListener("error", failed);
  if (image.complete) {
    if (image.naturalWidth) { zoom("fit"); } else { failed(); }
  } else {
    image.addEventListener("load", function () { zoom("fit"); });
  }
})();
