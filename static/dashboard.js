/* The live dashboard: draws the numbers and uPlot charts from the page's JSON, then fetches
   it again every few seconds with the page session in the X-B24relay-Session header.
   Every value goes in with textContent: error texts come from Bitrix24 and the PBX. */
(function () {
  "use strict";
  var root = document.getElementById("dashboard");
  if (!root) { return; }
  var labels = JSON.parse(document.getElementById("dashboard-labels").textContent);
  var charts = {};

  function get(data, path) {
    return path.split(".").reduce(function (v, k) { return v == null ? v : v[k]; }, data);
  }

  function format(value, kind) {
    if (value === null || value === undefined) { return "—"; }
    if (kind === "seconds") { return value < 1 ? Math.round(value * 1000) + " ms" : value.toFixed(2) + " s"; }
    if (kind === "percent") { return Math.round(value * 100) + " %"; }
    if (kind === "duration") {
      if (value <= 0) { return "0"; }
      var m = Math.floor(value / 60);
      return m >= 60 ? Math.floor(m / 60) + " h " + (m % 60) + " min" : m + " min";
    }
    return String(value);
  }

  function cell(row, text) {
    var td = document.createElement("td");
    td.textContent = text;
    row.appendChild(td);
    return td;
  }

  function fields(data) {
    root.querySelectorAll("[data-field]").forEach(function (el) {
      var name = el.getAttribute("data-field");
      if (name === "updated") { el.textContent = new Date().toLocaleTimeString(); return; }
      el.textContent = format(get(data, name), el.getAttribute("data-format"));
    });
    var status = document.getElementById("status");
    status.classList.toggle("bad", data.portal.status !== "active");
  }

  function counts(data) {
    root.querySelectorAll("table[data-counts]").forEach(function (table) {
      var body = table.querySelector("tbody");
      var values = get(data, table.getAttribute("data-counts")) || {};
      body.replaceChildren();
      Object.keys(values).sort().forEach(function (key) {
        var row = document.createElement("tr");
        cell(row, labels[key] || key);
        cell(row, String(values[key]));
        body.appendChild(row);
      });
      if (!body.children.length) {
        var none = document.createElement("tr");
        cell(none, "—");
        body.appendChild(none);
      }
    });
  }

  function operating(data) {
    var body = document.querySelector("#operating tbody");
    body.replaceChildren();
    data.operating.forEach(function (m) {
      var row = document.createElement("tr");
      row.setAttribute("data-method", m.method);
      cell(row, m.method);
      cell(row, m.seconds.toFixed(1));
      cell(row, String(m.budget));
      var bar = document.createElement("span");
      bar.className = "share" + (m.share >= 0.8 ? " high" : "");
      bar.style.width = Math.max(1, Math.round(Math.min(1, m.share) * 120)) + "px";
      var share = cell(row, " " + format(m.share, "percent"));
      share.prepend(bar);
      body.appendChild(row);
    });
    document.getElementById("operating-none").hidden = data.operating.length > 0;
  }

  function errors(data) {
    var body = document.querySelector("#errors tbody");
    body.replaceChildren();
    data.errors.forEach(function (e) {
      var row = document.createElement("tr");
      cell(row, e.at ? e.at.replace("T", " ").slice(0, 19) : "");
      cell(row, (labels[e.kind] || e.kind) + ": " + e.what);
      cell(row, e.words);
      cell(row, e.detail);
      body.appendChild(row);
    });
    document.getElementById("errors-none").hidden = data.errors.length > 0;
  }

  function columns(data) {
    var s = data.series;
    var pick = function (k) { return s.map(function (m) { return m.batches ? m[k] : null; }); };
    return {
      roundTrip: [s.map(function (m) { return m.minute; }), pick("p50"), pick("p95"), pick("max")],
      rate: [s.map(function (m) { return m.minute; }),
             s.map(function (m) { return Math.round(m.sent / 60 * 100) / 100; }),
             s.map(function (m) { return m.rate_limited; })]
    };
  }

  function chart(id, series, scales, axes, values) {
    var el = document.getElementById(id);
    var opts = { width: Math.max(300, el.clientWidth || 600), height: 220, series: series,
                 scales: scales, axes: axes };
    return new window.uPlot(opts, values, el);
  }

  var dots = { show: true, size: 5 };  /* a lone busy minute between idle ones is a dot */

  function drawn(id, values) {
    /* how many minutes carry data: what the chart drew (read by the browser test) */
    var n = values[0].filter(function (_, i) {
      return values.slice(1).some(function (s) { return s[i] !== null && s[i] !== 0; });
    }).length;
    document.getElementById(id).setAttribute("data-points", String(n));
  }

  function draw(data) {
    if (!window.uPlot) { return; }
    var c = columns(data);
    drawn("chart-round-trip", c.roundTrip);
    drawn("chart-rate", c.rate);
    var rt = document.getElementById("chart-round-trip").dataset;
    var rate = document.getElementById("chart-rate").dataset;
    if (!charts.roundTrip) {
      charts.roundTrip = chart("chart-round-trip", [{},
        { label: rt.labelP50, stroke: "#2067b0", points: dots },
        { label: rt.labelP95, stroke: "#e08a00", points: dots },
        { label: rt.labelMax, stroke: "#c33", dash: [4, 4], points: dots }],
        { x: { time: true } }, [{}, { label: rt.labelUnit }], c.roundTrip);
      charts.rate = chart("chart-rate", [{},
        { label: rate.labelCommands, stroke: "#3a9a3a", scale: "cps" },
        { label: rate.labelLimited, stroke: "#c33", scale: "n", paths: window.uPlot.paths.bars() }],
        { x: { time: true }, cps: { auto: true }, n: { auto: true } },
        [{}, { scale: "cps", label: rate.labelCommands },
         { scale: "n", side: 1, label: rate.labelLimited, grid: { show: false } }], c.rate);
    } else {
      charts.roundTrip.setData(c.roundTrip);
      charts.rate.setData(c.rate);
    }
  }

  function show(data) {
    fields(data);
    counts(data);
    operating(data);
    errors(data);
    draw(data);
  }

  function refresh() {
    fetch(root.getAttribute("data-url"), {
      headers: { "X-B24relay-Session": root.getAttribute("data-session"), "Accept": "application/json" },
      credentials: "omit", cache: "no-store"
    }).then(function (response) {
      if (!response.ok) { throw new Error("HTTP " + response.status); }
      return response.json();
    }).then(function (data) {
      document.getElementById("refresh-error").hidden = true;
      show(data);
    }).catch(function () {
      document.getElementById("refresh-error").hidden = false;
    });
  }

  show(JSON.parse(document.getElementById("dashboard-data").textContent));
  window.setInterval(refresh, 1000 * Number(root.getAttribute("data-refresh") || 5));
})();
