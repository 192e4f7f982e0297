// The chat page. Stop aborts the request's own AbortController, so the relay sees the
// connection close, and also asks the server to stop that generation, for proxies that do
// not pass an abort on. A lease, renewed while the answer streams, stops the model when
// the page vanishes without a word. Model output only ever goes into textContent.
import { readEvents } from "./sse.js";

// Chrome runs the timers of a tab hidden for 5+ minutes at most once a minute ("intensive
// throttling"), so a renewal every 15 s may come up to ~75 s apart: the lease outlasts that.
// A page that vanishes without a FIN or a goodbye stops the model within LEASE_SECONDS.
const LEASE_SECONDS = 90;
const RENEW_MS = 15000;

const STORE = "relay-chat";
const transcript = document.querySelector("#transcript");
const form = document.querySelector("#composer");
const input = document.querySelector("#prompt");
const sendButton = document.querySelector("#send");
const demo = document.body.dataset.demo === "true";

let messages = load();
let current = null; // the turn streaming now: {controller, message, settled}
const views = new Map(); // message -> its DOM nodes

/** Read the saved conversation; a turn that was streaming when the page went away was cut. */
function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE)) || [];
    for (const m of saved) if (m.status === "streaming") m.status = "stopped";
    return saved;
  } catch {
    return [];
  }
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(messages));
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function render() {
  views.clear();
  transcript.replaceChildren(...messages.map(view));
  transcript.scrollTop = transcript.scrollHeight;
}

/** Build the DOM of one message. */
function view(message) {
  const article = el("article", `message ${message.role}`);
  const text = el("div", "text", message.content);
  article.append(text);
  const parts = { article, text };
  if (message.role === "assistant") {
    parts.footer = el("div", "footer");
    article.append(parts.footer);
    updateFooter(message, parts);
  }
  views.set(message, parts);
  return article;
}

/** Show a message's status, meta and actions. */
function updateFooter(message, parts = views.get(message)) {
  if (!parts) return;
  parts.article.dataset.status = message.status;
  parts.article.setAttribute("aria-busy", String(message.status === "streaming"));
  const label = { streaming: "Generating…", complete: "Complete", stopped: "Stopped", error: "Error" }[message.status];
  parts.meta = el("span", "meta", metaText(message));
  const children = [el("span", "badge", label), parts.meta];
  if (message.status === "stopped") children.push(action("Regenerate", message));
  if (message.status === "error") children.push(action("Retry", message));
  parts.footer.replaceChildren(...children);
  parts.article.querySelector(".error-text")?.remove();
  if (message.status === "error") parts.article.insertBefore(el("div", "error-text", message.error), parts.footer);
}

/** Time to first token, tokens, duration and, after a Stop, what the model made after it. */
function metaText(message) {
  const m = message.meta || {};
  const facts = [];
  if (m.ttft != null) facts.push(`first token ${Math.round(m.ttft)} ms`);
  // A stopped answer's provider sends no usage: the server's lower bound says what was billed at least.
  facts.push(m.atLeast != null ? `≥ ${m.atLeast} tokens` : `${m.tokens || 0} tokens`);
  if (m.duration != null) facts.push(`${(m.duration / 1000).toFixed(1)} s`);
  if (m.afterStop != null) facts.push(`model made ${m.afterStop} token${m.afterStop === 1 ? "" : "s"} after Stop`);
  return facts.join(" · ");
}

function action(label, message) {
  const button = el("button", "", label);
  button.type = "button";
  button.addEventListener("click", () => regenerate(message));
  return button;
}

function setBusy(busy) {
  sendButton.textContent = busy ? "Stop generating" : "Send";
  sendButton.classList.toggle("stop", busy);
  sendButton.type = busy ? "button" : "submit";
}

/** The messages the model sees: what the user saw, stopped answers included, failed ones not. */
function history() {
  return messages
    .filter((m) => m.role === "user" || (m.status !== "error" && m.content))
    .map(({ role, content }) => ({ role, content }));
}

function send(text) {
  stop(); // a new message while one streams stops the old one first
  messages.push({ role: "user", content: text });
  generate();
}

function regenerate(message) {
  stop();
  messages = messages.slice(0, messages.indexOf(message));
  generate();
}

function stop() {
  if (!current) return;
  current.controller.abort();
  sendStop(current);
}

/** Ask the server to stop a generation, whatever the proxies in between do with the abort. */
function sendStop(turn) {
  if (turn.settled || turn.stopSent) return;
  turn.stopSent = true;
  // keepalive: the request outlives the page, e.g. when Stop is the last thing before leaving.
  fetch(`/api/generations/${encodeURIComponent(turn.message.meta.id)}/stop`, { method: "POST", keepalive: true })
    .catch(() => {});
}

/** Push the turn's lease forward; called on a timer and as events arrive. */
function renew(turn) {
  if (turn.settled || performance.now() - turn.renewed < RENEW_MS / 2) return;
  turn.renewed = performance.now();
  fetch(`/api/generations/${encodeURIComponent(turn.message.meta.id)}/lease`, { method: "POST", keepalive: true })
    .catch(() => {});
}

/** Stream one answer into a new assistant message, and settle how it ended. */
/** A fresh generation id, so the page can ask the log about it even if Stop beats `start`. */
function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16)); // also on plain-HTTP origins
  return "gen_" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function generate() {
  const id = newId();
  const body = JSON.stringify({ id, messages: history(), lease_seconds: LEASE_SECONDS });
  const message = { role: "assistant", content: "", status: "streaming", meta: { id, tokens: 0 } };
  messages.push(message);
  save();
  render();
  const turn = { controller: new AbortController(), message, settled: false, renewed: performance.now() };
  current = turn;
  setBusy(true);
  const started = performance.now();
  const renewer = setInterval(() => renew(turn), RENEW_MS);
  const settle = (status, extra) => {
    if (turn.settled) return;
    turn.settled = true;
    clearInterval(renewer);
    Object.assign(message, { status }, extra);
    message.meta.duration = performance.now() - started;
    updateFooter(message);
    save();
  };
  try {
    const response = await fetch("/api/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body,
      signal: turn.controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => null);
      throw new Error(error?.error?.message || `The server answered ${response.status}.`);
    }
    for await (const { event, data } of readEvents(response.body)) {
      const payload = JSON.parse(data);
      renew(turn); // a hidden tab's timers may be throttled; its stream events are not
      if (event === "delta") {
        message.meta.ttft ??= performance.now() - started;
        message.meta.tokens += 1;
        message.content += payload.text;
        const parts = views.get(message);
        if (parts) {
          parts.text.append(payload.text); // per token: only the text and the count change
          parts.meta.textContent = metaText(message);
        }
      } else if (event === "done") {
        settle("complete", { usage: payload.usage });
      } else if (event === "error") {
        settle("error", { error: payload.message, errorType: payload.type });
      } else if (event === "cancelled") {
        settle("stopped"); // stopped by a stop request (another tab, a script) or a lapsed lease
        reconcile(message);
      }
    }
    settle("error", { error: "The connection closed before the answer finished." });
  } catch (err) {
    if (err.name === "AbortError" && !turn.settled) {
      settle("stopped");
      reconcile(message);
    } else {
      // After `done` a late Stop changes nothing: settle() keeps the first outcome.
      settle("error", { error: `Network error: ${err.message}` });
    }
  } finally {
    clearInterval(renewer);
    if (current === turn) {
      current = null;
      setBusy(false);
    }
  }
}

async function getJSON(url) {
  const response = await fetch(url);
  return response.ok ? response.json() : null;
}

/** After Stop, agree with the server's log; with the demo model, show what it made after Stop. */
async function reconcile(message) {
  const id = message.meta.id;
  if (!id) return;
  let record = null;
  for (let i = 0; i < 20 && (!record || record.status === "streaming"); i++) {
    if (i) await new Promise((r) => setTimeout(r, 100));
    record = await getJSON(`/api/generations/${encodeURIComponent(id)}`);
  }
  if (record?.status === "complete") {
    // The answer was finished before Stop reached the server: keep it whole, as the log does.
    Object.assign(message, { status: "complete", content: record.text });
    message.meta.tokens = record.chunks;
    const parts = views.get(message);
    if (parts) parts.text.textContent = record.text;
  }
  if (record?.status === "cancelled" && record.usage_estimate) message.meta.atLeast = record.usage_estimate.output_tokens;
  if (demo && record?.status === "cancelled" && record.upstream_request_id) {
    let meter = null;
    for (let i = 0; i < 20 && (!meter || meter.status === "generating"); i++) {
      if (i) await new Promise((r) => setTimeout(r, 100));
      meter = await getJSON(`/demo/v1/requests/${encodeURIComponent(record.upstream_request_id)}`);
    }
    if (meter && meter.tokens_after_disconnect != null) message.meta.afterStop = meter.tokens_after_disconnect;
  }
  updateFooter(message);
  save();
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  send(text);
});

sendButton.addEventListener("click", (event) => {
  if (current) {
    event.preventDefault();
    stop();
    input.focus();
  }
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.requestSubmit();
  }
});

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") stop();
});

document.querySelector("#new-chat").addEventListener("click", () => {
  stop();
  messages = [];
  save();
  render();
  input.focus();
});

// Leaving mid-stream: the browser aborts the fetch, and a beacon asks the server to stop
// too, in case a proxy keeps the stream open. The partial answer is saved.
window.addEventListener("pagehide", () => {
  if (current && !current.settled && !current.stopSent) {
    current.stopSent = true;
    navigator.sendBeacon(`/api/generations/${encodeURIComponent(current.message.meta.id)}/stop`);
  }
  save();
});

render();
