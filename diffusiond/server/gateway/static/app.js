// The diffusiond web page: one request at a time through POST /v1/generate/stream (Server-Sent Events),
// previews shown as they arrive. Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "diffusiond-token";
let models = [];
let running = null; // the AbortController of the request in flight

function headers(json) {
  const h = json ? { "content-type": "application/json" } : {};
  const token = $("token").value.trim();
  if (token) h.authorization = `Bearer ${token}`;
  return h;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    if (body.error) {
      if (body.error.code === "UNAUTHENTICATED") $("auth").open = true;
      return `${body.error.code}: ${body.error.message}`;
    }
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

function option(value, text, selected) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  o.selected = Boolean(selected);
  return o;
}

function sizesOf(m) {
  const sizes = new Set([m.defaultWidth]);
  for (const s of [m.defaultWidth / 2, m.defaultWidth * 2, 256, 512, 768, 1024]) {
    if (s >= m.minSize && s <= m.maxSize && s % m.sizeMultiple === 0) sizes.add(s);
  }
  return [...sizes].sort((a, b) => a - b);
}

// Preview kinds the page can show (raw latents it cannot), as a model's previewKinds name them.
const PREVIEW_LABELS = {
  PREVIEW_KIND_TINY_DECODER: "tiny decoder (full size)",
  PREVIEW_KIND_APPROX_RGB: "approximate (free)",
  PREVIEW_KIND_FULL: "full decode",
};
const OLD_SERVER_PREVIEWS = ["PREVIEW_KIND_APPROX_RGB", "PREVIEW_KIND_FULL"]; // servers without previewKinds

function previewOptions(m) {
  const kinds = (m.previewKinds && m.previewKinds.length ? m.previewKinds : OLD_SERVER_PREVIEWS)
    .filter((k) => k in PREVIEW_LABELS);
  // The model lists its best live preview first: selected by default.
  return [...kinds.map((k, i) => option(k, PREVIEW_LABELS[k], i === 0)), option("PREVIEW_KIND_UNSPECIFIED", "none")];
}

function showModel() {
  const m = models.find((x) => x.name === $("model").value) || models[0];
  if (!m) return;
  $("size").replaceChildren(...sizesOf(m).map((s) => option(`${s}x${s}`, `${s} × ${s}`, s === m.defaultWidth)));
  $("scheduler").replaceChildren(option("", `model default (${m.defaultScheduler})`, true),
    ...m.schedulers.map((s) => option(s, s)));
  $("preview-kind").replaceChildren(...previewOptions(m));
  $("steps").placeholder = `default ${m.defaultSteps}`;
  $("guidance").placeholder = `default ${m.defaultGuidanceScale}`;
}

async function loadModels() {
  const response = await fetch("v1/models", { headers: headers(false) });
  if (!response.ok) {
    $("server-state").textContent = "not ready";
    showError(await errorOf(response));
    return;
  }
  models = (await response.json()).models || [];
  $("model").replaceChildren(...models.map((m) => option(m.name, m.name, m.isDefault)));
  showModel();
  $("server-state").textContent = `${models.length} model${models.length === 1 ? "" : "s"} loaded`;
  showError("");
}

function requestBody() {
  const [width, height] = $("size").value.split("x").map(Number);
  const body = {
    prompt: $("prompt").value,
    negativePrompt: $("negative").value,
    model: $("model").value,
    width: width || 0,
    height: height || 0,
    scheduler: $("scheduler").value,
    preview: { kind: $("preview-kind").value, everyNSteps: 1 },
  };
  if ($("steps").value) body.steps = Number($("steps").value);
  if ($("guidance").value) body.guidanceScale = Number($("guidance").value);
  if ($("seed").value) body.seed = $("seed").value; // a string: 64-bit integers in protobuf's JSON mapping
  return body;
}

// Server-Sent Events from a fetch response body: yields {event, data}.
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

const EXTENSIONS = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" };

function handle(event, data) {
  if (event === "queued") {
    $("status").textContent = data.queued.position ? `queued, ${data.queued.position} ahead` : "starting";
  } else if (event === "started") {
    $("status").textContent = `started: seed ${data.started.seed}, ${data.started.scheduler}`;
  } else if (event === "step") {
    const s = data.step;
    $("progress").value = s.step / s.totalSteps;
    $("status").textContent = `step ${s.step}/${s.totalSteps} · ETA ${s.etaS.toFixed(1)} s`;
    if (s.previews && s.previews.length) $("preview").src = s.previews[0].dataUrl;
  } else if (event === "result") {
    const r = data.result;
    const image = r.images[0];
    $("progress").value = 1;
    $("result").src = image.dataUrl;
    const link = $("download");
    link.href = image.dataUrl;
    link.download = `diffusiond-${image.seed}.${EXTENSIONS[image.mimeType] || "img"}`;
    link.hidden = false;
    $("result-info").textContent = `seed ${image.seed} · ${r.model} · ${r.scheduler} · ${r.steps} steps`;
    $("status").textContent = `done in ${r.timings.totalS.toFixed(2)} s${r.fromCache ? " (from cache)" : ""}`;
  } else if (event === "error") {
    showError(`${data.error.code}: ${data.error.message}`);
    $("status").textContent = "failed";
  }
}

async function generate(submit) {
  submit.preventDefault();
  if (running) return;
  showError("");
  $("progress").value = 0;
  $("status").textContent = "sending";
  $("download").hidden = true;
  running = new AbortController();
  $("generate").disabled = true;
  $("cancel").disabled = false;
  sessionStorage.setItem(TOKEN_KEY, $("token").value);
  try {
    const response = await fetch("v1/generate/stream", {
      method: "POST", headers: headers(true), body: JSON.stringify(requestBody()), signal: running.signal,
    });
    if (!response.ok) {
      showError(await errorOf(response));
      $("status").textContent = "failed";
      return;
    }
    for await (const { event, data } of sseEvents(response.body)) handle(event, data);
  } catch (err) {
    if (err.name === "AbortError") $("status").textContent = "cancelled";
    else showError(String(err));
  } finally {
    running = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", () => running && running.abort());
  $("model").addEventListener("change", showModel);
  $("token").addEventListener("change", loadModels);
  loadModels();
});
