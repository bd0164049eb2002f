// The chat page: a multi-turn conversation over the server's OpenAI-compatible
// API (POST v1/chat/completions with stream: true, read as server-sent events
// from the fetch body), with Stop, a model picker and per-answer timings.
// Model text only ever reaches the page through renderMarkdown (text nodes).

import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const ui = {
  log: $("log"),
  empty: $("empty"),
  status: $("status"),
  form: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  model: $("model"),
  newChat: $("new-chat"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
  system: $("system"),
  apiKey: $("api-key"),
};

// Relative URLs, so the page also works behind a reverse proxy under a path prefix.
const API = { chat: "v1/chat/completions", models: "v1/models" };
const STORE = "llm-stream.chat.";
const history = []; // {role, content} of the finished turns, in order
let current = null; // the generation in flight: {controller, view}

// -- settings, kept in localStorage --------------------------------------------

function remember(input, key, event = "change") {
  const saved = localStorage.getItem(STORE + key);
  if (saved !== null) input.value = saved;
  input.addEventListener(event, () => localStorage.setItem(STORE + key, input.value));
}

remember(ui.temperature, "temperature");
remember(ui.maxTokens, "maxTokens");
remember(ui.system, "system", "input");
remember(ui.apiKey, "apiKey", "input");
ui.apiKey.addEventListener("change", loadModels);
$("settings-form").addEventListener("submit", (event) => event.preventDefault());

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function setStatus(text) {
  ui.status.textContent = text || "";
  ui.status.hidden = !text;
}

// The message of an OpenAI-shaped error body, or the HTTP status.
async function errorMessage(response) {
  let detail = "";
  try {
    const body = await response.json();
    detail = body?.error?.message || body?.detail || "";
  } catch {
    // not JSON
  }
  return `${response.status} ${response.statusText}${detail ? `: ${detail}` : ""}`.trim();
}

// -- models ------------------------------------------------------------------

const RETRY_DEFAULT_S = 2; // when a 503 names no Retry-After
let modelsAttempt = 0; // the latest loadModels call; older ones give way to it
let modelsRetry = null; // the timer of the next try while the server warms up

// Seconds to wait after a 503: its Retry-After (whole seconds), else RETRY_DEFAULT_S.
function retryAfter(response) {
  const seconds = Number.parseInt(response.headers.get("retry-after") ?? "", 10);
  return Number.isFinite(seconds) && seconds > 0 ? Math.min(seconds, 60) : RETRY_DEFAULT_S;
}

// Fills the model picker; while the server answers 503 (warming up), tries again
// after its Retry-After until the list comes.
async function loadModels() {
  const attempt = ++modelsAttempt;
  clearTimeout(modelsRetry);
  modelsRetry = null;
  const wanted = localStorage.getItem(STORE + "model") || ui.model.value;
  try {
    const response = await fetch(API.models, { headers: headers() });
    if (attempt !== modelsAttempt) return; // a newer call (a new API key) took over
    if (response.status === 503) {
      const wait = retryAfter(response);
      modelsRetry = setTimeout(loadModels, wait * 1000);
      throw new Error(`${await errorMessage(response)} (trying again in ${wait} s)`);
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    const { data = [] } = await response.json();
    if (attempt !== modelsAttempt) return;
    ui.model.replaceChildren(
      ...data.map((m) => {
        const option = document.createElement("option");
        option.value = option.textContent = m.id;
        return option;
      }),
    );
    if (data.some((m) => m.id === wanted)) ui.model.value = wanted;
    // The form takes no more than the server does (--max-tokens-cap).
    const cap = data.find((m) => m.id === ui.model.value)?.max_tokens_cap;
    if (Number.isInteger(cap)) ui.maxTokens.max = String(cap);
    ui.model.disabled = data.length === 0;
    setStatus(data.length ? "" : "The server lists no models.");
  } catch (error) {
    if (attempt !== modelsAttempt) return;
    const option = document.createElement("option");
    option.value = "";
    option.textContent = "(unavailable)";
    ui.model.replaceChildren(option);
    setStatus(`Could not list the models: ${error.message}`);
    if (/^401\b/.test(error.message)) $("settings").open = true;
  }
}

ui.model.addEventListener("change", () => localStorage.setItem(STORE + "model", ui.model.value));

// -- the conversation view -----------------------------------------------------

function nearBottom() {
  const root = document.scrollingElement;
  return root.scrollHeight - root.scrollTop - root.clientHeight < 80;
}

function scrollDown(wasNearBottom) {
  if (wasNearBottom) window.scrollTo({ top: document.body.scrollHeight });
}

function addMessage(role, text) {
  ui.empty.hidden = true;
  const article = document.createElement("article");
  article.className = `msg ${role}`;
  const body = document.createElement("div");
  body.className = "content";
  article.append(body);
  if (role === "user") body.textContent = text;
  ui.log.append(article);
  return { article, body };
}

function answerView() {
  const { article, body } = addMessage("assistant");
  article.dataset.state = "waiting";
  body.append(Object.assign(document.createElement("span"), { className: "cursor" }));
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = "waiting for the first token…";
  article.append(meta);
  return { article, body, meta, text: "" };
}

function render(view) {
  const follow = nearBottom();
  const fragment = renderMarkdown(view.text);
  if (view.article.dataset.state === "streaming") {
    fragment.append(Object.assign(document.createElement("span"), { className: "cursor" }));
  }
  view.body.replaceChildren(fragment);
  scrollDown(follow);
}

function format(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

// "TTFT 84 ms · 120 tokens · 23.4 tokens/s", tokens/s over the time after the first token.
function timings(stats) {
  const parts = [];
  if (stats.first !== null) parts.push(`TTFT ${format(stats.first - stats.start)}`);
  const tokens = stats.usageTokens ?? stats.chunks;
  parts.push(`${tokens} token${tokens === 1 ? "" : "s"}`);
  if (stats.first !== null && stats.end > stats.first && tokens > 1) {
    parts.push(`${((tokens - 1) / ((stats.end - stats.first) / 1000)).toFixed(1)} tokens/s`);
  }
  return parts.join(" · ");
}

// -- streaming ----------------------------------------------------------------

// Yields the data of each server-sent event in a fetch body.
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let ended = false;
  try {
    yield* eventBatches(reader, "");
    ended = true;
  } finally {
    // Only a reader that stopped early (Stop, an error) cancels: one read to its end
    // finishes the request cleanly, where a cancel shows as a failed request.
    if (!ended) reader.cancel().catch(() => {});
  }
}

async function* eventBatches(reader, buffer) {
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();
    const batch = [];
    for (const event of events) {
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) batch.push(data);
    }
    if (batch.length) yield batch; // one render per network read
  }
}

function finishReasonText(reason) {
  return { stop: "", length: "max tokens reached", content_filter: "filtered" }[reason] ?? reason ?? "";
}

async function ask(question) {
  const messages = [];
  const system = ui.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history, { role: "user", content: question });

  addMessage("user", question);
  const view = answerView();
  scrollDown(true);
  const controller = new AbortController();
  current = { controller, view };
  setBusy(true);

  const request = { model: ui.model.value || undefined, messages, stream: true, stream_options: { include_usage: true } };
  const temperature = Number.parseFloat(ui.temperature.value);
  if (Number.isFinite(temperature)) request.temperature = temperature;
  const maxTokens = Number.parseInt(ui.maxTokens.value, 10);
  if (Number.isFinite(maxTokens) && maxTokens > 0) request.max_tokens = maxTokens;

  const stats = { start: performance.now(), first: null, end: null, chunks: 0, usageTokens: null };
  let finish = null;
  let outcome = "done";
  let error = "";
  try {
    const response = await fetch(API.chat, {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(request),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    view.article.dataset.requestId = response.headers.get("x-request-id") || "";
    let streamDone = false;
    // Read to the end of the body, [DONE] included: the server closes it right after.
    for await (const batch of serverSentEvents(response.body)) {
      if (streamDone) continue;
      for (const data of batch) {
        if (data === "[DONE]") {
          streamDone = true;
          break;
        }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
        if (chunk.id && !view.article.dataset.id) view.article.dataset.id = chunk.id;
        if (chunk.usage) stats.usageTokens = chunk.usage.completion_tokens;
        const choice = chunk.choices?.[0];
        if (!choice) continue;
        const piece = choice.delta?.content;
        if (piece) {
          if (stats.first === null) stats.first = performance.now();
          stats.chunks += 1;
          view.text += piece;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      if (view.text) view.article.dataset.state = "streaming";
      render(view);
      stats.end = performance.now();
      view.meta.textContent = timings(stats);
    }
    if (!streamDone && finish === null) throw new Error("the stream ended early");
  } catch (caught) {
    if (controller.signal.aborted) {
      outcome = "stopped";
    } else {
      outcome = "error";
      error = caught instanceof TypeError ? `network error (${caught.message})` : caught.message;
    }
  }
  stats.end = performance.now();
  view.article.dataset.state = outcome;
  render(view);
  const notes = [timings(stats)];
  if (outcome === "stopped") notes.push("stopped");
  else if (finishReasonText(finish)) notes.push(finishReasonText(finish));
  view.meta.textContent = notes.join(" · ");
  view.meta.hidden = outcome === "error" && stats.chunks === 0;
  if (outcome === "error") {
    const problem = document.createElement("p");
    problem.className = "error";
    problem.textContent = error;
    view.article.insertBefore(problem, view.meta);
  }
  // A stopped answer stays in the history as far as it got; a failed turn is dropped.
  if (outcome !== "error" || view.text) {
    history.push({ role: "user", content: question }, { role: "assistant", content: view.text });
    saveHistory();
  }
  current = null;
  setBusy(false);
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.newChat.disabled = busy;
  document.body.classList.toggle("busy", busy);
  if (!busy) ui.prompt.focus();
}

// -- input --------------------------------------------------------------------

function grow() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 240)}px`;
}

ui.prompt.addEventListener("input", grow);
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const question = ui.prompt.value.trim();
  if (!question || current) return;
  if (!ui.maxTokens.checkValidity()) {
    // Above the server's cap (or not a whole number): say so before asking.
    $("settings").open = true;
    ui.maxTokens.reportValidity();
    return;
  }
  ui.prompt.value = "";
  grow();
  ask(question);
});

ui.stop.addEventListener("click", () => current?.controller.abort());

ui.newChat.addEventListener("click", () => {
  if (current) return;
  history.length = 0;
  localStorage.removeItem(STORE + "history");
  ui.log.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  ui.prompt.focus();
});

// -- the conversation, kept in localStorage until "New chat" -----------------------

function saveHistory() {
  localStorage.setItem(STORE + "history", JSON.stringify(history));
}

function restoreHistory() {
  let saved;
  try {
    saved = JSON.parse(localStorage.getItem(STORE + "history") || "[]");
  } catch {
    saved = [];
  }
  if (!Array.isArray(saved)) return;
  const text = (turn, role) => turn?.role === role && typeof turn.content === "string";
  for (let i = 0; i + 1 < saved.length; i += 2) {
    const [question, answer] = [saved[i], saved[i + 1]];
    if (!text(question, "user") || !text(answer, "assistant")) break;
    history.push({ role: "user", content: question.content }, { role: "assistant", content: answer.content });
    addMessage("user", question.content);
    const { article, body } = addMessage("assistant");
    article.dataset.state = "done";
    body.replaceChildren(renderMarkdown(answer.content));
  }
  if (history.length) scrollDown(true);
}

restoreHistory();
loadModels();
ui.prompt.focus();
