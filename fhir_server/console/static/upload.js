// Upload with progress: each file posted on its own (XMLHttpRequest, for upload progress) to the
// console's upload route, with a message per file from the server's answer. Size and type are
// checked here first; the server checks them again. Without this script the form posts as is.
(function () {
  "use strict";
  var form = document.getElementById("upload-form");
  if (!form || !window.FormData || !window.XMLHttpRequest) { return; }
  var input = document.getElementById("files");
  var zone = document.getElementById("dropzone");
  var list = document.getElementById("file-list");
  var results = document.getElementById("results");
  var maxPhoto = Number(form.getAttribute("data-max-photo"));
  var maxDicom = Number(form.getAttribute("data-max-dicom"));
  var photoTypes = ["image/png", "image/jpeg", "image/tiff", "image/gif", "image/bmp"];
  var dropped = null;

  function size(n) { return n < 1024 ? n + " B" : n < 1048576 ? (n / 1024).toFixed(1) + " KiB" : (n / 1048576).toFixed(1) + " MiB"; }

  function row(file) {
    var item = document.createElement("li");
    var name = document.createElement("strong");
    name.textContent = file.name;
    var bar = document.createElement("progress");
    bar.max = 100; bar.value = 0;
    bar.setAttribute("aria-label", "Upload of " + file.name);
    var text = document.createElement("span");
    text.textContent = " (" + size(file.size) + ") ";
    item.append(name, text, bar);
    list.appendChild(item);
    results.hidden = false;
    return {item: item, bar: bar, text: text};
  }

  function done(view, ok, message, link) {
    view.bar.remove();
    view.item.className = ok ? "ok" : "bad";
    view.item.setAttribute("data-ok", ok ? "true" : "false");
    view.text.textContent = view.text.textContent + message;
    if (link) {
      var a = document.createElement("a");
      a.href = link; a.textContent = " Open";
      view.item.appendChild(a);
    }
  }

  function precheck(file) {
    var dicom = /\.dcm$/i.test(file.name) || file.type === "application/dicom" || file.type === "";
    if (file.size === 0) { return "Refused: the file is empty."; }
    if (photoTypes.indexOf(file.type) >= 0 && file.size > maxPhoto) {
      return "Refused: photographs may have at most " + size(maxPhoto) + ".";
    }
    if (file.size > maxDicom) { return "Refused: files may have at most " + size(maxDicom) + "."; }
    if (!dicom && photoTypes.indexOf(file.type) < 0) {
      return "Refused: not a DICOM file or a PNG, JPEG, TIFF, GIF or BMP image.";
    }
    return null;
  }

  function send(file) {
    return new Promise(function (resolve) {
      var view = row(file);
      var problem = precheck(file);
      if (problem) { done(view, false, problem); resolve(); return; }
      var data = new FormData();
      ["csrf", "patient", "site", "eye", "quality", "anatomy"].forEach(function (name) {
        data.append(name, form.elements[name].value);
      });
      if (form.elements.over_illuminated.checked) { data.append("over_illuminated", "yes"); }
      data.append("files", file, file.name);
      var request = new XMLHttpRequest();
      request.open("POST", form.getAttribute("data-endpoint"));
      request.upload.addEventListener("progress", function (event) {
        if (event.lengthComputable) { view.bar.value = Math.round(100 * event.loaded / event.total); }
      });
      request.addEventListener("load", function () {
        var answer = null;
        try { answer = JSON.parse(request.responseText); } catch (e) { answer = null; }
        var message = answer && (answer.message || (answer.issue && answer.issue[0] && answer.issue[0].diagnostics));
        done(view, !!(answer && answer.ok), message || ("Refused: the server answered " + request.status + "."),
             answer && answer.link);
        resolve();
      });
      request.addEventListener("error", function () { done(view, false, "Not sent: the connection failed."); resolve(); });
      request.send(data);
    });
  }

  async function sendAll(files) {
    for (var i = 0; i < files.length; i++) { await send(files[i]); }
    input.value = "";
    dropped = null;
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var files = dropped || Array.from(input.files);
    if (!files.length) { input.focus(); return; }
    sendAll(files);
  });
  ["dragenter", "dragover"].forEach(function (name) {
    zone.addEventListener(name, function (event) { event.preventDefault(); zone.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (name) {
    zone.addEventListener(name, function () { zone.classList.remove("over"); });
  });
  zone.addEventListener("drop", function (event) {
    event.preventDefault();
    sendAll(Array.from(event.dataTransfer.files));
  });
})();
