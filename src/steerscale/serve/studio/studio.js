// steerscale studio: plain, steered and prompt-only replies side by side, streamed from this server's own
// OpenAI-compatible API, and optionally the steered request under a scaling strategy (docs/studio.md). No framework
// and no build step: what a user sees is what the API does.

const $ = (sel) => document.querySelector(sel);
const KEY_STORE = "steerscale.apiKey";

const state = { model: null, vectors: [], strategies: new Map(), sent: false, runs: new Map(), debounce: null };

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

function options(select, items, label, keepFirst) {
  const kept = keepFirst ? [select.options[0]] : [];
  select.replaceChildren(...kept, ...items.map((item) => {
    const option = document.createElement("option");
    option.value = item.id;
    option.textContent = label(item);
    return option;
  }));
  select.dataset.loaded = String(items.length);
}

// The pickers: GET /v1/models, GET /v1/steering/{vectors,conditions,gates,controllers,saes}; the strategies the server's
// library knows (GET /studio/strategies.json: names and knobs).
async function connect() {
  try {
    const models = await getJSON("/v1/models");
    state.model = models.data[0].id;
    $("#model").textContent = state.model;
    const [vectors, conditions, gates, controllers, saes] = await Promise.all(
      ["vectors", "conditions", "gates", "controllers", "saes"].map(
        async (kind) => (await getJSON(`/v1/steering/${kind}`)).data));
    options($("#condition"), conditions, (c) => `${c.id} (${c.site}, ${c.comparison} ${c.threshold.toFixed(3)})`, true);
    options($("#gate"), gates, (g) => `${g.id} (${g.site}, ${g.invert ? "below" : "above"} ${g.threshold.toFixed(2)})`,
            true);
    options($("#controller"), controllers, (c) => `${c.id} (edits ${c.edits.join(", ")}; max ${c.max_strength})`);
    options($("#sae"), saes, (s) => s.id);
    $("#kind option[value=controller]").disabled = !controllers.length;
    $("#kind option[value=feature]").disabled = !saes.length;
    const strategies = await getJSON("/studio/strategies.json");
    options($("#strategy"), strategies.data, (s) => s.id, true);
    state.strategies = new Map(strategies.data.map((s) => [s.id, s.knobs]));
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

function showKind() {
  const kind = $("#kind").value;
  for (const el of document.querySelectorAll("[data-kind]")) el.hidden = el.dataset.kind !== kind;
}

function column(name) {
  const el = $(`#col-${name}`);
  return { el, out: el.querySelector(".output"), err: el.querySelector(".error"), meta: el.querySelector(".meta") };
}

function usageText(usage) {
  return usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : "? tokens";
}

// A strategy's spending (the response's steerscale.budget): what it used of each limit.
function budgetText(info) {
  if (!info || !info.budget) return "";
  const spent = Object.entries(info.budget.spent || {}).filter(([, v]) => v).map(([k, v]) =>
    `${k} ${Number.isInteger(v) ? v : Math.abs(v) >= 1000 ? v.toExponential(2) : v.toFixed(2)}`);
  const limits = Object.entries(info.budget.limits || {}).map(([k, v]) => `${k}=${v}`);
  return ` · ${info.strategy}: ${info.n_candidates ?? "?"} candidates, spent ${spent.join(", ") || "nothing"}`
    + (limits.length ? ` of ${limits.join(",")}` : "") + (info.budget.exhausted ? " (budget exhausted)" : "");
}

// One chat completion into one column: streamed (text as it arrives) or, for a strategy, whole; then the
// server's token counts and the timings.
async function run(name, body, stream = true) {
  const col = column(name);
  state.runs.get(name)?.abort(); // a newer run replaces a running one
  const controller = new AbortController();
  state.runs.set(name, controller);
  col.el.dataset.run = String(Number(col.el.dataset.run) + 1);
  col.el.dataset.state = "streaming";
  col.el.dataset.chunks = "0";
  col.out.textContent = "";
  col.err.textContent = "";
  col.meta.textContent = "";
  const started = performance.now();
  let first = null;
  let firstRead = null; // when the chunk holding the first text had been read off the stream
  let readAt = 0;
  let usage = null;
  let buffer = "";
  const decoder = new TextDecoder();
  let extra = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model: state.model, temperature: 0, max_tokens: Number($("#max-tokens").value) || 48,
        ...(stream ? { stream: true, stream_options: { include_usage: true } } : {}), ...body }),
    });
    if (!resp.ok) throw await failure(resp);
    if (!stream) {
      const answer = await resp.json();
      first = performance.now() - started;
      col.out.textContent = answer.choices[0].message.content;
      col.el.dataset.chunks = "1";
      usage = answer.usage;
      extra = budgetText(answer.steerscale);
    }
    const reader = stream ? resp.body.getReader() : null;
    while (reader) {
      const { value, done } = await reader.read();
      readAt = performance.now();
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
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            const text = choice.delta && choice.delta.content;
            if (!text) continue;
            col.out.textContent += text;
            if (first === null) {
              first = performance.now() - started;
              firstRead = readAt - started;
            }
            col.el.dataset.chunks = String(Number(col.el.dataset.chunks) + 1);
          }
        }
      }
    }
    const total = performance.now() - started;
    const tokens = usage && usage.completion_tokens;
    col.el.dataset.ttftMs = first === null ? "" : first.toFixed(1);
    col.el.dataset.firstReadMs = firstRead === null ? "" : firstRead.toFixed(1);
    col.el.dataset.completionTokens = tokens ?? "";
    col.el.dataset.promptTokens = usage ? usage.prompt_tokens : "";
    col.meta.textContent = `${usageText(usage)} · ${stream ? "first token" : "answer"} `
      + `${first === null ? "-" : first.toFixed(0)} ms · ${total.toFixed(0)} ms · `
      + `${tokens ? (tokens / (total / 1000)).toFixed(1) : "-"} tokens/s${extra}`;
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

// The steered column's steer entry, from the picked kind: a vector (with its scope, an optional condition and an
// optional token gate; the server refuses both at once, and the column shows its error), a
// controller, or an SAE feature (Neuronpedia's shape); and the column title saying which.
function steerEntry() {
  const scale = Number($("#scale").value);
  const kind = $("#kind").value;
  if (kind === "controller") {
    return [{ controller: $("#controller").value, scale }, `controller ${$("#controller").value} x${scale}`];
  }
  if (kind === "feature") {
    const index = Number($("#feature").value);
    return [{ layer: $("#sae").value, index, strength: scale }, `${$("#sae").value} feature ${index} x${scale}`];
  }
  const entry = { vector: $("#vector").value.trim(), scale, scope: $("#scope").value };
  const condition = $("#condition").value;
  if (condition) entry.condition = condition;
  const gate = $("#gate").value;
  if (gate) entry.gate = gate;
  const scope = entry.scope === "all" ? "" : `, ${entry.scope} tokens`;
  return [entry, `${entry.vector || "(no vector)"} x${scale}${scope}${condition ? `, if ${condition}` : ""}`
    + `${gate ? `, from where ${gate} fires` : ""}`];
}

// The strategy column: the steered request run by a scaling strategy under a budget (not streamed: the server
// answers once the strategy has chosen).
function strategyBody(entry) {
  const name = $("#strategy").value;
  if (!name) return null;
  const strategy = { name };
  const budget = $("#budget").value.trim();
  if (budget) strategy.budget = budget;
  const knobs = state.strategies.get(name) || [];
  if (knobs.includes("n")) strategy.n = Number($("#strategy-n").value) || 4;
  return { messages: [userMessage()], steer: [entry], strategy };
}

function steered() {
  const [entry, title] = steerEntry();
  $("#col-steered h2").textContent = `steered: ${title}`;
  const scaled = strategyBody(entry);
  $("#col-scaled").hidden = !scaled;
  $("#columns").dataset.columns = scaled ? "4" : "3";
  const runs = [run("steered", { messages: [userMessage()], steer: [entry] })];
  if (scaled) {
    const budget = scaled.strategy.budget ? ` (${scaled.strategy.budget})` : "";
    $("#col-scaled h2").textContent = `steered + ${scaled.strategy.name}${budget}`;
    runs.push(run("scaled", scaled, false));
  }
  return Promise.all(runs);
}

function sendAll() {
  state.sent = true;
  const system = $("#system").value.trim();
  $("#col-prompt h2").textContent = system ? `prompt only: "${system}"` : "prompt only (no system prompt)";
  const prompted = system ? [{ role: "system", content: system }, userMessage()] : [userMessage()];
  return Promise.all([run("plain", { messages: [userMessage()] }), steered(),
    run("prompt", { messages: prompted })]);
}

// A calibration (calibrate's calibration.json, or a vector set's summary) read in the page: its verdict and rows.
// Files are read locally (FileReader); nothing is uploaded.
function showCalibration(data) {
  const table = $("#calibration-table");
  const cell = (tag, text) => { const c = document.createElement(tag); c.textContent = text; return c; };
  const ci = (g) => (g ? `${g.diff >= 0 ? "+" : ""}${g.diff.toFixed(3)} [${g.lo.toFixed(3)}, ${g.hi.toFixed(3)}]` : "-");
  let head;
  let rows;
  if (Array.isArray(data.vectors)) {
    head = ["vector", "setting", "select gain", "test gain", "KL"];
    rows = data.vectors.map((v) => [v.name, v.recommended || "none", ci(v.select_gain), ci(v.test_gain),
      v.kl ? v.kl.mean.toFixed(3) : "-"]);
  } else if (Array.isArray(data.rows)) {
    head = ["setting", "stage", "gain [95% CI]", "KL", "note"];
    rows = data.rows.map((r) => [r.label, r.stage, ci(r.gain), r.kl.mean.toFixed(3),
      [r.recommended && "RECOMMENDED", r.on_front && "front", r.broken && "broken"].filter(Boolean).join(" ")]);
  } else {
    throw new Error("not a steerscale calibration (no rows or vectors)");
  }
  table.replaceChildren(...[head, ...rows].map((row, i) => {
    const tr = document.createElement("tr");
    tr.replaceChildren(...row.map((text) => cell(i ? "td" : "th", text)));
    return tr;
  }));
  $("#calibration-verdict").textContent = `verdict: ${data.verdict}` + (data.steer ? ` · steer: ${data.steer}` : "");
}

function readLocal(input, then) {
  const file = input.files[0];
  if (!file) return;
  then(file);
}

function init() {
  $("#send").addEventListener("click", sendAll);
  $("#vector").addEventListener("input", describeVector);
  $("#kind").addEventListener("change", showKind);
  $("#calibration-file").addEventListener("change", () => readLocal($("#calibration-file"), async (file) => {
    try {
      showCalibration(JSON.parse(await file.text()));
    } catch (err) {
      $("#calibration-table").replaceChildren();
      $("#calibration-verdict").textContent = `${file.name}: ${err.message}`;
    }
  }));
  $("#report-file").addEventListener("change", () => readLocal($("#report-file"), (file) => {
    const url = URL.createObjectURL(file);
    const view = file.type.startsWith("image/") ? document.createElement("img") : document.createElement("iframe");
    if (view.tagName === "IFRAME") view.sandbox = ""; // a report page is shown, never run
    view.src = url;
    view.title = file.name;
    $("#report-view").replaceChildren(view);
  }));
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
  showKind();
  connect();
}

init();
