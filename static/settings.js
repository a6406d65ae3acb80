/* The app's settings and diagnosis pages: guard single-use forms, and wait for a connection
   check's report (static/frame.js fits the portal's frame). Data is only set with textContent. */
(function () {
  /* Each form's token is single-use: a double click must not post it twice. */
  Array.prototype.forEach.call(document.querySelectorAll("form[method=post]"), function (form) {
    form.addEventListener("submit", function () {
      var button = form.querySelector("button[type=submit], button:not([type])");
      if (button) { button.disabled = true; }
    });
  });
  /* A check is running: poll the last report's time until a newer one is there, then show it. */
  var checking = document.getElementById("checking");
  if (!checking) { return; }
  var since = checking.getAttribute("data-since") || "";
  var poll = checking.getAttribute("data-poll");
  var show = checking.getAttribute("data-show");
  var session = new URLSearchParams(poll.split("?")[1] || "").get("s") || "";
  var tries = 0;
  function ask() {
    tries += 1;
    fetch(poll, { headers: { "X-B24relay-Session": session }, cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : {}; })
      .then(function (data) {
        if (data.checked_at && data.checked_at !== since) {
          window.location.href = show;
        } else if (tries < 90) {
          window.setTimeout(ask, 2000);
        } else {
          checking.textContent = checking.getAttribute("data-late") || checking.textContent;
        }
      })
      .catch(function () { if (tries < 90) { window.setTimeout(ask, 2000); } });
  }
  window.setTimeout(ask, 1000);
})();
