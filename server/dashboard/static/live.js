// Live run page: the server pushes the run's panel as HTML (already escaped) whenever it changes.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const panel = document.querySelector("[data-stream]");
  if (!panel || !window.EventSource) return;
  const source = new EventSource(panel.dataset.stream);
  source.addEventListener("update", (event) => {
    panel.innerHTML = event.data;
    panel.dataset.updates = String(Number(panel.dataset.updates || 0) + 1);
  });
  source.addEventListener("end", () => {
    source.close();
    panel.dataset.ended = "true";
  });
});
