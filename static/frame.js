/* Every page of the app inside the portal: the BX24 library the portal provides (loaded from
   B24_JS_SDK_URL) fits the portal's frame to the page, now and whenever the content grows or
   shrinks (a chart drawn, a section opened). Outside a portal there is no BX24: nothing to do. */
(function () {
  if (!window.BX24 || typeof window.BX24.init !== "function") { return; }
  var queued = false;
  function fit() {
    if (queued) { return; }
    queued = true;
    window.requestAnimationFrame(function () { queued = false; window.BX24.fitWindow(); });
  }
  window.BX24.init(function () {
    fit();
    if (window.ResizeObserver) { new window.ResizeObserver(fit).observe(document.body); }
  });
})();
