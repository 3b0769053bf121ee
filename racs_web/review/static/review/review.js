/* racs_web: copy-coordinates button and vetting hotkeys (letter = tag, arrows = previous / next). */
(function () {
  "use strict";
  var copy = document.getElementById("copy-coords");
  if (copy) {
    copy.addEventListener("click", function () {
      var text = copy.getAttribute("data-coords");
      if (navigator.clipboard) { navigator.clipboard.writeText(text); }
      copy.textContent = "copied";
    });
  }
  function typing(event) {
    var t = event.target;
    return t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable);
  }
  function arrows(event) {
    if (event.key === "ArrowLeft" || event.key === "ArrowRight") {
      var link = document.getElementById(event.key === "ArrowLeft" ? "prev" : "next");
      if (link) { event.preventDefault(); window.location.href = link.href; }
      return true;
    }
    return false;
  }
  window.racsArrows = function () {
    document.addEventListener("keydown", function (event) {
      if (!typing(event) && !event.ctrlKey && !event.metaKey && !event.altKey) { arrows(event); }
    });
  };
  window.racsHotkeys = function () {
    document.addEventListener("keydown", function (event) {
      if (typing(event) || event.ctrlKey || event.metaKey || event.altKey) { return; }
      if (arrows(event)) { return; }
      var form = document.querySelector('form.tag-form[data-hotkey="' + event.key + '"]');
      if (form) {
        var button = form.querySelector("button");
        if (button && !button.disabled) { event.preventDefault(); form.submit(); }
      }
    });
  };
})();
