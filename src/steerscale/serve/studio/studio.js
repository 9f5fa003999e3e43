// steerscale studio: plain, steered and prompt-only replies side by side, streamed from this server's own
// OpenAI-compatible API (docs/studio.md). No framework and no build step: what a user sees is what the API does.

const $ = (sel) => document.querySelector(sel);
const KEY_STORE = "steerscale.apiKey";

const state = { model: null, vectors: [], sent: false, controllers: new Map(), debounce: null };

class ApiFailure extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// The server's error text (OpenAI's shape: {"error": {"message": ...}}), or the status line.
async function failure(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status line */ }
  return new ApiFailure(resp.status, message);
}

async function getJSON(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

function needKey(message) {
  $("#key-panel").hidden = false;
  $("#status").textContent = message;
  $("#api-key").focus();
}

// The model and the vector picker: GET /v1/models, GET /v1/steering/vectors.
async function connect() {
  try {
    const models = await getJSON("/v1/models");
    state.model = models.data[0].id;
    $("#model").textContent = state.model;
    const vectors = (await getJSON("/v1/steering/vectors")).data;
    const list = $("#vector-list");
    list.replaceChildren(...vectors.map((v) => {
      const option = document.createElement("option");
      option.value = v.id;
      option.textContent = `${v.id} (${v.method}; ${v.sites.join(", ")})`;
      return option;
    }));
    list.dataset.loaded = String(vectors.length);
    if (!$("#vector").value && vectors.length) $("#vector").value = vectors[0].id;
    $("#key-panel").hidden = true;
    $("#status").textContent = vectors.length ? "" : "no vectors registered: steerscale serve --vector NAME=FILE";
    state.vectors = vectors;
    describeVector();
    document.body.dataset.ready = "true";
  } catch (err) {
    if (err.status === 401) needKey("this server needs an API key");
    else $("#status").textContent = `cannot reach the server's API: ${err.message}`;
  }
}

// The picked vector's card: method, sites and norms (from GET /v1/steering/vectors).
function describeVector() {
  const v = state.vectors.find((x) => x.id === $("#vector").value);
  $("#vector-info").textContent = v
    ? `${v.id}: ${v.method} at ${v.sites.join(", ")}, norm ${Object.values(v.norms).map((n) => n.toFixed(2)).join(", ")}`
    : "";
}

function column(name) {
  const el = $(`#col-${name}`);
  return { el, out: el.querySelector(".output"), err: el.querySelector(".error"), meta: el.querySelector(".meta") };
}

// One streamed chat completion into one column: text as it arrives, then tokens and timings.
async function run(name, body) {
  const col = column(name);
  state.controllers.get(name)?.abort(); // a newer run replaces a running one
  const controller = new AbortController();
  state.controllers.set(name, controller);
  col.el.dataset.run = String(Number(col.el.dataset.run) + 1);
  col.el.dataset.state = "streaming";
  col.el.dataset.chunks = "0";
  col.out.textContent = "";
  col.err.textContent = "";
  col.meta.textContent = "";
  const started = performance.now();
  let first = null;
  let tokens = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model: state.model, stream: true, stream_options: { include_usage: true },
        temperature: 0, max_tokens: Number($("#max-tokens").value) || 48, ...body }),
    });
    if (!resp.ok) throw await failure(resp);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiFailure(400, chunk.error.message);
          if (chunk.usage) tokens = chunk.usage.completion_tokens;
          for (const choice of chunk.choices || []) {
            const text = choice.delta && choice.delta.content;
            if (!text) continue;
            if (first === null) first = performance.now() - started;
            col.out.textContent += text;
            col.el.dataset.chunks = String(Number(col.el.dataset.chunks) + 1);
          }
        }
      }
    }
    const total = performance.now() - started;
    col.el.dataset.ttftMs = first === null ? "" : first.toFixed(1);
    col.meta.textContent = `${tokens ?? "?"} tokens · first token ${first === null ? "-" : first.toFixed(0)} ms · `
      + `${total.toFixed(0)} ms · ${tokens ? (tokens / (total / 1000)).toFixed(1) : "-"} tokens/s`;
    col.el.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") return; // replaced by a newer run of this column
    if (err.status === 401) needKey("the API key was refused: enter the server's key");
    col.err.textContent = err.message;
    col.el.dataset.state = "error";
  }
}

function userMessage() {
  return { role: "user", content: $("#prompt").value };
}

function steered() {
  const scale = Number($("#scale").value);
  $("#col-steered h2").textContent = `steered: ${$("#vector").value || "(no vector)"} x${scale}`;
  return run("steered", { messages: [userMessage()], steer: [{ vector: $("#vector").value.trim(), scale }] });
}

function sendAll() {
  state.sent = true;
  const system = $("#system").value.trim();
  $("#col-prompt h2").textContent = system ? `prompt only: "${system}"` : "prompt only (no system prompt)";
  const prompted = system ? [{ role: "system", content: system }, userMessage()] : [userMessage()];
  return Promise.all([run("plain", { messages: [userMessage()] }), steered(),
    run("prompt", { messages: prompted })]);
}

function init() {
  $("#send").addEventListener("click", sendAll);
  $("#vector").addEventListener("input", describeVector);
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) sendAll();
  });
  // The slider re-runs only the steered column (debounced: one request per pause, not one per pixel).
  $("#scale").addEventListener("input", () => {
    $("#scale-value").textContent = $("#scale").value;
    if (!state.sent) return;
    clearTimeout(state.debounce);
    state.debounce = setTimeout(steered, 250);
  });
  $("#save-key").addEventListener("click", () => {
    sessionStorage.setItem(KEY_STORE, $("#api-key").value.trim());
    $("#api-key").value = "";
    connect();
  });
  $("#scale-value").textContent = $("#scale").value;
  connect();
}

init();
