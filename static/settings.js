/* Settings page: resize the iframe to the content once the BX24 library is there. */
(function () {
  if (window.BX24 && typeof window.BX24.init === "function") {
    window.BX24.init(function () { window.BX24.fitWindow(); });
  }
  /* The form's token is single-use: a double click must not post it twice. */
  var form = document.querySelector("form[method=post]");
  if (form) {
    form.addEventListener("submit", function () {
      var button = form.querySelector("button[type=submit]");
      if (button) { button.disabled = true; }
    });
  }
})();
