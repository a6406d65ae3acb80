/* Settings page: resize the iframe to the content once the BX24 library is there. */
(function () {
  if (window.BX24 && typeof window.BX24.init === "function") {
    window.BX24.init(function () { window.BX24.fitWindow(); });
  }
})();
