// Device page: the counts chart (uPlot) over a chosen range, and the clip player.
"use strict";
(function () {
  const box = document.getElementById("chart");
  const note = document.getElementById("chart-note");
  const device = box.dataset.device;
  const series = [
    { label: "people", stroke: "#2759c9", width: 2 },
    { label: "with mask", stroke: "#16833a", width: 2 },
    { label: "without mask", stroke: "#b42318", width: 2 },
  ];
  let plot = null;
  let range = { seconds: 3600 };

  // Round bucket sizes, so that each bucket holds the same number of stats intervals.
  const NICE = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400];
  function niceBucket(seconds) {
    return NICE.find((n) => n >= seconds) || 86400;
  }

  function size() {
    return { width: Math.max(box.clientWidth, 280), height: window.innerWidth < 600 ? 240 : 300 };
  }

  async function load() {
    const end = range.end || Date.now() / 1000;
    const start = range.start || end - range.seconds;
    const bucket = niceBucket((end - start) / 400);
    const url = `/api/devices/${encodeURIComponent(device)}/stats?start=${start}&end=${end}&bucket=${bucket}`;
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok) {
      note.textContent = `could not load stats (HTTP ${response.status})`;
      return;
    }
    const rows = await response.json();
    const data = [
      rows.map((r) => r.start),
      rows.map((r) => r.people),
      rows.map((r) => r.mask),
      rows.map((r) => r.no_mask),
    ];
    note.textContent = rows.length
      ? `${rows.length} points, ${bucket} s each`
      : "no stats in this range";
    if (plot === null) {
      plot = new uPlot({ ...size(), series: [{}, ...series], scales: { x: { time: true } } }, data, box);
      box.dataset.drawnMs = String(Math.round(performance.now()));
      window.addEventListener("resize", () => plot.setSize(size()));
    } else {
      plot.setData(data);
    }
    box.dataset.points = String(rows.length);
  }

  document.querySelectorAll("button.range").forEach((button) => {
    button.addEventListener("click", () => {
      document.querySelectorAll("button.range").forEach((b) => b.classList.remove("active"));
      button.classList.add("active");
      range = { seconds: Number(button.dataset.seconds) };
      load();
    });
  });
  document.getElementById("range-apply").addEventListener("click", () => {
    const s = Date.parse(document.getElementById("range-start").value);
    const e = Date.parse(document.getElementById("range-end").value);
    if (Number.isNaN(s) || Number.isNaN(e) || e <= s) {
      note.textContent = "choose a start before the end";
      return;
    }
    document.querySelectorAll("button.range").forEach((b) => b.classList.remove("active"));
    range = { start: s / 1000, end: e / 1000 };
    load();
  });

  const player = document.getElementById("player");
  document.body.addEventListener("click", (event) => {
    const button = event.target.closest("button.play");
    if (button) {
      player.hidden = false;
      player.src = button.dataset.src;
      player.play().catch(() => {});
    }
  });

  load();
  setInterval(() => { if (!range.end) load(); }, 10000);
})();
