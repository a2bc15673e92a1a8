// Sluice dashboard: small progressive enhancements. Every page works without this file
// (forms post, pages reload); with it, jobs update live over websockets and charts draw.
(function () {
  "use strict";

  function wsUrl(path) {
    return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;
  }

  function setStatus(badge, status) {
    if (!badge) return;
    badge.textContent = status;
    badge.className = "badge status-" + status;
  }

  // --- copy buttons of shown-once secrets ------------------------------------------------
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (!button) return;
    var input = document.getElementById(button.dataset.copy);
    var note = button.nextElementSibling;
    function say(text) { if (note) note.textContent = text; }
    input.select();
    if (navigator.clipboard) {
      navigator.clipboard.writeText(input.value).then(
        function () { button.textContent = "Copied"; say("Copied to the clipboard."); },
        function () { say("Press Ctrl+C to copy the selected key."); });
    } else {
      say("Press Ctrl+C to copy the selected key.");
    }
  });

  // --- playground model picker ------------------------------------------------------------
  function initModelPicker(picker) {
    picker.addEventListener("change", function () {
      document.querySelectorAll("[data-model-panel]").forEach(function (panel) {
        panel.hidden = panel.dataset.modelPanel !== picker.value;
      });
    });
  }

  // --- one job: progress, output, result ----------------------------------------------------
  var TERMINAL = { "job.completed": "succeeded", "job.failed": "failed", "job.cancelled": "cancelled" };

  // A text job's tokens arrive as job.output events whose `data.delta` is the next piece of
  // text (what output moderation released); the panel's <pre> grows as they land.
  function appendTextDelta(panel, delta) {
    var out = panel.querySelector("[data-field=text]");
    if (out && typeof delta === "string") out.textContent += delta;
  }

  function field(panel, name) { return panel.querySelector("[data-field=" + name + "]"); }

  function showProgress(panel, data) {
    var pct = Math.round(data.progress || 0);
    var bar = field(panel, "progress");
    if (bar) { bar.value = pct; bar.textContent = pct + "%"; }
    if (field(panel, "percent")) field(panel, "percent").textContent = pct + "%";
    if (data.step !== undefined && field(panel, "step")) field(panel, "step").textContent = data.step;
    if (data.steps !== undefined && field(panel, "steps")) field(panel, "steps").textContent = data.steps;
    if (field(panel, "eta")) field(panel, "eta").textContent =
      data.eta_s === undefined || data.eta_s === null ? "—" : data.eta_s.toFixed(1) + " s";
  }

  function showResult(panel) {
    var url = panel.dataset.contentUrl;
    var media = field(panel, "media");
    if (!url || !media) return;
    field(panel, "thumbnail").src = url + "?variant=thumbnail";
    var video = field(panel, "video");
    video.src = url + "?variant=video";
    video.load();
    media.hidden = false;
  }

  function onJobEvent(panel, event) {
    var data = event.data || {};
    if (event.type === "job.started") setStatus(field(panel, "status"), "running");
    else if (event.type === "job.queued") setStatus(field(panel, "status"), "queued");
    else if (event.type === "job.progress") showProgress(panel, data);
    else if (event.type === "job.output") appendTextDelta(panel, data.delta);
    else if (TERMINAL[event.type]) {
      panel.dataset.status = TERMINAL[event.type];
      setStatus(field(panel, "status"), TERMINAL[event.type]);
      if (data.actual_cu !== undefined && field(panel, "actual")) field(panel, "actual").textContent = data.actual_cu;
      if (data.error && field(panel, "error")) field(panel, "error").textContent = data.error.code + ": " + data.error.message;
      var cancel = field(panel, "cancel");
      if (cancel) cancel.hidden = true;
      if (event.type === "job.completed") {
        showProgress(panel, { progress: 100, eta_s: 0 });
        showResult(panel);
      }
    }
  }

  // Close codes 4000 + an HTTP status: 4503 (unavailable) is worth retrying, the rest are refusals.
  function mayResume(code) {
    return code < 4000 || code === 4503;
  }

  function followJob(panel) {
    var lastSeq = 0;
    function connect() {
      var socket = new WebSocket(wsUrl(panel.dataset.eventsUrl + "?after=" + lastSeq));
      socket.onmessage = function (message) {
        var event = JSON.parse(message.data);
        lastSeq = event.seq || lastSeq;
        onJobEvent(panel, event);
      };
      socket.onclose = function (closed) {
        // 4401/4403/4404: not allowed, retrying cannot help; anything else (a network error,
        // 1011, 4503: the server could not read the stream) resumes after the last event seen.
        var done = ["succeeded", "failed", "cancelled"].indexOf(panel.dataset.status) >= 0;
        if (!done && mayResume(closed.code)) setTimeout(connect, 1000);
      };
    }
    connect();
  }

  // --- the live job list ------------------------------------------------------------------
  function initLiveJobs(container) {
    var state = document.getElementById("live-state");
    var refreshTimer = null;
    var pollTimer = null;
    function refresh() {
      if (window.htmx) {
        window.htmx.ajax("GET", container.dataset.refreshUrl + location.search,
          { target: container, swap: "innerHTML" });
      }
    }
    function refreshSoon() {
      clearTimeout(refreshTimer);
      refreshTimer = setTimeout(refresh, 300);
    }
    function connect() {
      var socket = new WebSocket(wsUrl(container.dataset.liveJobs));
      socket.onopen = function () {
        if (state) state.textContent = "Live updates: on";
        clearInterval(pollTimer);
        pollTimer = null;
      };
      socket.onmessage = function (message) {
        var event = JSON.parse(message.data);
        var status = TERMINAL[event.type] || { "job.started": "running", "job.queued": "queued" }[event.type];
        if (!status) return;
        var row = document.getElementById("job-row-" + event.data.job_id);
        if (row) setStatus(row.querySelector("[data-field=status]"), status);
        refreshSoon(); // new rows, filters, CU actuals: the server renders them
      };
      socket.onclose = function (closed) {
        if (!mayResume(closed.code)) { if (state) state.textContent = "Live updates: not allowed"; return; }
        // Fallback: poll while the websocket is down, and keep trying to reconnect.
        if (state) state.textContent = "Live updates: reconnecting (refreshing every 5 s)";
        if (!pollTimer) pollTimer = setInterval(refresh, 5000);
        setTimeout(connect, 5000);
      };
    }
    connect();
  }

  // --- charts (overview) -----------------------------------------------------------------
  var PALETTE = ["#0b5cad", "#b35c00", "#2e7d32", "#7b3fa0", "#b42318", "#00727a"];

  function initCharts() {
    if (!window.Chart) return;
    // Numbers, not motion: charts draw at once (no vestibular trigger, stable screenshots).
    window.Chart.defaults.animation = false;
    var gauge = document.getElementById("budget-gauge");
    if (gauge) {
      var used = Math.min(100, parseFloat(gauge.dataset.used) || 0);
      new window.Chart(gauge, {
        type: "doughnut",
        data: { datasets: [{ data: [used, 100 - used],
          backgroundColor: [used >= 80 ? "#b42318" : used >= 60 ? "#b35c00" : "#0b5cad", "#d0d7de"], borderWidth: 0 }] },
        options: { rotation: -90, circumference: 180, cutout: "70%", responsive: false,
          plugins: { legend: { display: false }, tooltip: { enabled: false } } },
      });
    }
    var burn = document.getElementById("burn-chart");
    var data = document.getElementById("burn-data");
    if (burn && data) {
      var parsed = JSON.parse(data.textContent);
      new window.Chart(burn, {
        type: "bar",
        data: { labels: parsed.labels.map(function (d) { return d.slice(5); }),
          datasets: parsed.series.map(function (s, i) {
            return { label: s.model, data: s.cu, backgroundColor: PALETTE[i % PALETTE.length] };
          }) },
        options: { maintainAspectRatio: false, scales: { x: { stacked: true }, y: { stacked: true, title: { display: true, text: "CU" } } } },
      });
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-model-picker]").forEach(initModelPicker);
    document.querySelectorAll(".job-panel[data-events-url]").forEach(function (panel) {
      if (["succeeded", "failed", "cancelled"].indexOf(panel.dataset.status) < 0) followJob(panel);
    });
    document.querySelectorAll("[data-live-jobs]").forEach(initLiveJobs);
    initCharts();
  });

  window.sluice = { appendTextDelta: appendTextDelta, followJob: followJob };
})();
