/* Dead letters: fit the frame; a form's token is single-use, so one click posts one form. */
(function () {
  if (window.BX24 && typeof window.BX24.init === "function") {
    window.BX24.init(function () { window.BX24.fitWindow(); });
  }
  var posted = false;
  document.querySelectorAll("form[method=post]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (posted) { event.preventDefault(); return; }
      posted = true;
      document.querySelectorAll("button[type=submit]").forEach(function (b) { b.disabled = true; });
    });
  });
})();
