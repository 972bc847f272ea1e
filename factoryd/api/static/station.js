// factoryd station page: renders what GET /station/events pushes; no framework, no CDN.
"use strict";

(() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const canOperate = document.body.dataset.operate === "true";
  const GLYPH = {
    empty: "○", idle: "–", unknown: "?", disabled: "⊘", powering: "⏻", enumerating: "⏻",
    provisioning: "⚙", done: "✓", failed: "✗", attention: "!",
  };
  const EVENTS_SHOWN = 15;
  const RECONNECT_MAX_MS = 10000;

  const grid = document.getElementById("grid");
  const banner = document.getElementById("banner");
  const connection = document.getElementById("connection");
  const toast = document.getElementById("toast");
  let source = null;
  let reconnectTimer = null;
  let reconnectDelay = 1000;
  let toastTimer = null;
  let currentLot = null;

  // Connection -------------------------------------------------------------------------------

  let everConnected = false;

  function setConnected(connected) {
    everConnected = everConnected || connected;
    document.body.dataset.connected = String(connected);
    connection.dataset.connected = String(connected);
    connection.textContent = connected ? "live" : everConnected ? "reconnecting…" : "connecting…";
    banner.hidden = connected || !everConnected;
  }

  function connect() {
    reconnectTimer = null;
    source = new EventSource("/station/events");
    source.addEventListener("snapshot", (e) => {
      renderSnapshot(JSON.parse(e.data));
      reconnectDelay = 1000;
      setConnected(true);
    });
    source.addEventListener("slot", (e) => renderSlot(JSON.parse(e.data)));
    source.addEventListener("lot", (e) => renderLot(JSON.parse(e.data)));
    source.addEventListener("event", (e) => addEvent(JSON.parse(e.data)));
    source.addEventListener("logout", () => window.location.reload());
    source.onerror = () => {
      setConnected(false);
      // The browser retries by itself after a dropped stream; a refused one (401, 503) stays closed.
      if (source.readyState === EventSource.CLOSED) scheduleReconnect();
    };
  }

  function scheduleReconnect() {
    if (reconnectTimer !== null) return;
    source.close();
    reconnectTimer = window.setTimeout(async () => {
      try {
        const answer = await fetch("/station/session", { cache: "no-store", credentials: "same-origin" });
        if (answer.status === 401 || answer.status === 403) {
          window.location.reload();  // the session is gone: show the login form
          return;
        }
      } catch (_) {
        // The daemon is not answering yet; try again below.
      }
      reconnectDelay = Math.min(reconnectDelay * 2, RECONNECT_MAX_MS);
      connect();
    }, reconnectDelay);
  }

  // Slots -------------------------------------------------------------------------------------

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function makeSlot(port) {
    const slot = el("article", "slot");
    slot.dataset.port = port;
    const head = el("div", "slot-head");
    head.append(el("span", "slot-label"), el("span", "slot-flag"), el("span", "slot-port"));
    const progress = el("div", "slot-progress");
    progress.append(el("div"));
    const actions = el("div", "slot-actions operate-only");
    for (const [action, label] of [["retry", "Retry"], ["ack", "Acknowledge"], ["disable", "Disable"], ["enable", "Enable"]]) {
      const button = el("button", `act-${action}`, label);
      button.type = "button";
      button.dataset.action = action;
      button.addEventListener("click", () =>
        act(`/station/actions/ports/${encodeURIComponent(port)}/${action}`, button, `${label}: slot ${slot.dataset.label}`));
      actions.append(button);
    }
    slot.append(head, el("div", "slot-title"), el("div", "slot-detail"), el("div", "slot-device"), progress, actions);
    return slot;
  }

  function renderSlot(view) {
    let slot = grid.querySelector(`.slot[data-port="${CSS.escape(view.port)}"]`);
    if (!slot) {
      slot = makeSlot(view.port);
      grid.append(slot);
    }
    slot.dataset.state = view.state;
    slot.dataset.enabled = String(view.enabled);
    slot.dataset.label = view.label;
    slot.setAttribute("aria-label", `Slot ${view.label}: ${view.title}. ${view.detail}`);
    slot.querySelector(".slot-label").textContent = view.label;
    slot.querySelector(".slot-port").textContent = view.label === view.port ? "" : `port ${view.port}`;
    const flag = slot.querySelector(".slot-flag");
    flag.textContent = view.enabled ? "" : "OFF";
    flag.hidden = view.enabled;
    const title = slot.querySelector(".slot-title");
    title.textContent = view.title;
    title.dataset.glyph = GLYPH[view.state] || "";
    slot.querySelector(".slot-detail").textContent = view.detail;
    slot.querySelector(".slot-device").textContent = view.device_id || "";
    const progress = slot.querySelector(".slot-progress");
    const bar = progress.firstElementChild;
    if (view.state === "provisioning" && view.step_index) {
      progress.hidden = false;
      bar.style.width = `${Math.round((100 * view.step_index) / view.step_total)}%`;
    } else if (view.state === "done") {
      progress.hidden = false;
      bar.style.width = "100%";
    } else {
      progress.hidden = true;
    }
    const show = {
      retry: view.state === "failed" || view.state === "attention" || view.state === "done",
      ack: view.state === "attention",
      disable: view.enabled,
      enable: !view.enabled,
    };
    for (const button of slot.querySelectorAll(".slot-actions button")) {
      button.hidden = !show[button.dataset.action];
    }
  }

  function renderSnapshot(data) {
    document.getElementById("station-name").textContent = data.station;
    grid.style.setProperty("--cols", String(data.columns));
    grid.dataset.rows = String(data.rows);
    grid.dataset.columns = String(data.columns);
    const wanted = data.slots.map((s) => s.port);
    for (const slot of [...grid.querySelectorAll(".slot")]) {
      if (!wanted.includes(slot.dataset.port)) slot.remove();
    }
    for (const view of data.slots) renderSlot(view);
    // Keep the fixture order even when slots were added by updates before the snapshot.
    for (const port of wanted) grid.append(grid.querySelector(`.slot[data-port="${CSS.escape(port)}"]`));
    renderLot(data.lot);
    document.getElementById("events").replaceChildren();
    for (const event of data.events) addEvent(event);
  }

  // Lot and events -----------------------------------------------------------------------------

  function show(id, value) {
    document.getElementById(id).textContent = value === null || value === undefined ? "—" : String(value);
  }

  function renderLot(lot) {
    currentLot = lot && lot.name ? lot : null;
    const state = document.getElementById("lot-state");
    show("lot-name", lot ? lot.name : null);
    state.textContent = lot && lot.state ? lot.state : "none active";
    state.dataset.state = lot && lot.state ? lot.state : "none";
    show("lot-done", lot ? lot.done : null);
    show("lot-remaining", lot ? lot.remaining : null);
    show("lot-failed", lot ? lot.failed : null);
    show("lot-uph", lot ? lot.units_per_hour : null);
    let note = "";
    if (lot && lot.error) note = lot.error;
    else if (lot && lot.void) note = `${lot.void} ID(s) voided.`;
    else if (!lot) note = "No lot is active on this station.";
    document.getElementById("lot-note").textContent = note;
    document.getElementById("lot-pause").hidden = !(currentLot && currentLot.state === "active");
    document.getElementById("lot-resume").hidden = !(currentLot && currentLot.state === "paused");
  }

  function addEvent(event) {
    const list = document.getElementById("events");
    const item = el("li");
    item.dataset.tone = event.tone;
    item.dataset.port = event.port;
    const when = el("time", "", event.at ? new Date(event.at).toLocaleTimeString() : "");
    if (event.at) when.dateTime = event.at;
    item.append(when, el("span", "ev-slot", event.label), el("span", "ev-text", event.text));
    list.prepend(item);  // newest on top (history arrives oldest first)
    while (list.children.length > EVENTS_SHOWN) list.lastElementChild.remove();
  }

  // Actions ------------------------------------------------------------------------------------

  function say(message, tone) {
    toast.textContent = message;
    toast.dataset.tone = tone;
    toast.hidden = false;
    window.clearTimeout(toastTimer);
    toastTimer = window.setTimeout(() => { toast.hidden = true; }, 4000);
  }

  async function act(url, button, what) {
    if (!canOperate) return;
    button.disabled = true;
    try {
      const answer = await fetch(url, {
        method: "POST",
        credentials: "same-origin",
        headers: { "X-Factoryd-CSRF": csrf },
      });
      if (answer.ok) {
        say(`${what}: done`, "ok");
        const result = await answer.json();
        if (currentLot && result.lot === currentLot.name) renderLot({ ...currentLot, state: result.state });
      } else {
        let detail = `HTTP ${answer.status}`;
        try { detail = (await answer.json()).detail || detail; } catch (_) { /* not JSON */ }
        say(`${what}: ${detail}`, "bad");
        if (answer.status === 401) window.setTimeout(() => window.location.reload(), 1500);
      }
    } catch (_) {
      say(`${what}: the station is not answering`, "bad");
    } finally {
      button.disabled = false;
    }
  }

  document.getElementById("lot-pause").addEventListener("click", (e) => {
    if (currentLot) act(`/station/actions/lots/${encodeURIComponent(currentLot.name)}/pause`, e.currentTarget, `Pause lot ${currentLot.name}`);
  });
  document.getElementById("lot-resume").addEventListener("click", (e) => {
    if (currentLot) act(`/station/actions/lots/${encodeURIComponent(currentLot.name)}/resume`, e.currentTarget, `Resume lot ${currentLot.name}`);
  });
  document.getElementById("logout").addEventListener("click", async () => {
    try {
      await fetch("/station/logout", { method: "POST", credentials: "same-origin", headers: { "X-Factoryd-CSRF": csrf } });
    } finally {
      window.location.reload();
    }
  });

  // Labels panel (GET /station/labels, factoryd/api/page/printing.py) -----------------------

  const LABELS_POLL_MS = 3000;
  const labelsPanel = document.getElementById("labels");
  const labelFigure = document.getElementById("label-figure");
  const labelPreview = document.getElementById("label-preview");

  function printerText(p) {
    const ports = p.ports.join(", ");
    if (p.ready === null) return `${p.address} (ports ${ports}): not tried yet`;
    if (p.ready) return `${p.address} (ports ${ports}): ready, ${p.printed} printed`;
    const why = (p.condition || "trouble").replace(/_/g, " ");
    const retry = p.retry_in_s ? `, retrying every ${Math.round(p.retry_in_s)} s` : "";
    return `${p.address} (ports ${ports}): ${why}; labels wait${retry}`;
  }

  function showPreview(job) {
    labelPreview.src = `/station/labels/${job.id}/preview.png?t=${Date.now()}`;
    document.getElementById("label-caption").textContent = `${job.device_id} · port ${job.port}`;
    labelFigure.hidden = false;
  }

  function renderLabels(data) {
    labelsPanel.hidden = !data.enabled;
    if (!data.enabled) return;
    const queued = document.getElementById("labels-queued");
    queued.textContent = data.queued ? `${data.queued} waiting` : "all printed";
    queued.dataset.tone = data.queued ? "bad" : "ok";
    const printers = document.getElementById("printers");
    printers.replaceChildren(...data.printers.map((p) => {
      const li = el("li", "", printerText(p));
      li.dataset.ready = String(p.ready !== false);
      if (p.message) li.title = p.message;
      return li;
    }));
    const list = document.getElementById("label-jobs");
    list.replaceChildren(...data.jobs.map((job) => {
      const li = el("li");
      li.dataset.state = job.state;
      const id = el("span", "lbl-id", `${job.device_id} · port ${job.port}${job.kind === "reprint" ? " · reprint" : ""}`);
      const state = el("span", "lbl-state", job.state);
      if (job.error) state.title = job.error;
      const buttons = el("span", "lbl-actions");
      const view = el("button", "small", "Preview");
      view.type = "button";
      view.addEventListener("click", () => showPreview(job));
      buttons.append(view);
      if (canOperate) {
        const again = el("button", "small", "Reprint");
        again.type = "button";
        again.addEventListener("click", (e) => act(`/station/actions/labels/${job.id}/reprint`, e.currentTarget, `Reprint ${job.device_id}`));
        buttons.append(again);
      }
      li.append(id, state, buttons);
      return li;
    }));
  }

  async function pollLabels() {
    try {
      const answer = await fetch("/station/labels", { cache: "no-store", credentials: "same-origin" });
      if (answer.ok) renderLabels(await answer.json());
    } catch (_) {
      // The connection banner already says the station is not answering.
    } finally {
      window.setTimeout(pollLabels, LABELS_POLL_MS);
    }
  }

  document.getElementById("reprint-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!canOperate) return;
    const input = document.getElementById("reprint-device");
    const deviceId = input.value.trim();
    if (!deviceId) return;
    try {
      const answer = await fetch("/station/actions/labels/reprint", {
        method: "POST",
        credentials: "same-origin",
        headers: { "X-Factoryd-CSRF": csrf, "Content-Type": "application/json" },
        body: JSON.stringify({ device_id: deviceId }),
      });
      if (answer.ok) {
        say(`Reprint ${deviceId}: queued`, "ok");
        input.value = "";
      } else {
        let detail = `HTTP ${answer.status}`;
        try { detail = (await answer.json()).detail || detail; } catch (_) { /* not JSON */ }
        say(`Reprint ${deviceId}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`, "bad");
      }
    } catch (_) {
      say(`Reprint ${deviceId}: the station is not answering`, "bad");
    }
  });

  setConnected(false);
  connect();
  pollLabels();
})();
