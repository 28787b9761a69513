// The ops console's only script: job progress, "select all", and the purge confirmation
// that waits for the download. Every page works without it, except the live progress.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", () => {
      for (const box of document.querySelectorAll('input[name="event_id"]')) box.checked = all.checked;
    });
  }

  const download = document.getElementById("download");
  const downloaded = document.getElementById("downloaded");
  const confirm = document.getElementById("purge-form") && document.getElementById("confirm");
  if (confirm && downloaded) {
    const update = () => { confirm.disabled = !downloaded.checked; };
    downloaded.addEventListener("change", update);
    if (download) download.addEventListener("click", () => { downloaded.checked = true; update(); });
    update();
  }

  const job = document.getElementById("job");
  if (job) {
    const url = job.dataset.statusUrl;
    const bar = document.getElementById("progress");
    const text = document.getElementById("progress-text");
    const outcome = document.getElementById("outcome");
    const poll = async () => {
      try {
        const response = await fetch(url, { credentials: "same-origin" });
        const status = await response.json();
        bar.max = Math.max(status.total, 1);
        bar.value = status.done;
        text.textContent = `${status.done} of ${status.total}`;
        if (status.finished) {
          outcome.textContent = status.outcome.summary;
          outcome.className = status.outcome.ok ? "ok" : "error";
          return;
        }
      } catch (e) {
        text.textContent = "progress unavailable; reload the page";
      }
      setTimeout(poll, 500);
    };
    poll();
  }
});
