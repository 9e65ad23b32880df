// The example SPA's "build output": a client-side router, one call to the
// API behind /api and one WebSocket to /capture. Served by ringlb from
// examples/spa/dist (config/spa.toml).
(function () {
  "use strict";
  var out = document.getElementById("out");
  function show(line) {
    var p = document.createElement("p");
    p.textContent = line;
    out.appendChild(p);
  }
  function route() {
    document.getElementById("where").textContent = location.pathname;
  }
  document.addEventListener("click", function (e) {
    var a = e.target.closest("a[data-link]");
    if (!a) return;
    e.preventDefault();
    history.pushState(null, "", a.getAttribute("href"));
    route();
  });
  window.addEventListener("popstate", route);
  route();

  fetch("/api/hello?from=spa")
    .then(function (r) { return r.json(); })
    .then(function (j) { show("api saw " + j.method + " " + j.path + " from " + j.headers["X-Real-IP"]); })
    .catch(function (err) { show("api: " + err); });

  var ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/capture");
  ws.onopen = function () { ws.send("hello through ringlb"); };
  ws.onmessage = function (m) { show("capture echoed: " + m.data); ws.close(); };
  ws.onerror = function () { show("capture: websocket error"); };
})();
