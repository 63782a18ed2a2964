// The web chat: talks to tuneloop's own OpenAI-compatible API, streams the
// reply, and sends 👍/👎 and corrections to /api/exchanges/{id}/feedback.
"use strict";

const $ = (sel) => document.querySelector(sel);
const log = $("#log");
const input = $("#input");
const userBox = $("#user");
const sendButton = $("#send-button");

function randomHex(n) {
  const bytes = new Uint8Array(n);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// The user's name lives in localStorage; a random guest name by default.
let user = localStorage.getItem("tuneloop.user");
if (!user) {
  user = "guest-" + randomHex(3);
  localStorage.setItem("tuneloop.user", user);
}
userBox.value = user;
userBox.addEventListener("change", () => {
  const name = userBox.value.trim();
  if (name) {
    user = name;
    localStorage.setItem("tuneloop.user", user);
  } else {
    userBox.value = user;
  }
});

let conversation = null;
let history = [];
let model = "tuneloop";
let busy = false;

function newConversation() {
  conversation = "web-" + randomHex(6);
  history = [];
  log.replaceChildren();
  input.focus();
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return body.error ? body.error.message : resp.statusText;
  } catch (e) {
    return `${resp.status} ${resp.statusText}`;
  }
}

function add(cls, text) {
  const div = document.createElement("div");
  div.className = "msg " + cls;
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.append(span);
  log.append(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function showError(message) {
  add("error", "⚠ " + message);
}

async function sendFeedback(exchangeId, body) {
  const resp = await fetch(`/api/exchanges/${exchangeId}/feedback`, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Tuneloop-Client": "web" },
    body: JSON.stringify(Object.assign({ user }, body)),
  });
  if (!resp.ok) throw new Error(await errorText(resp));
  return resp.json();
}

// 👍/👎, a box for a better reply, once the reply has its exchange id.
function addTools(bubble, exchangeId) {
  bubble.dataset.exchangeId = String(exchangeId);
  const tools = document.createElement("div");
  tools.className = "tools";
  const up = document.createElement("button");
  up.className = "rate-up";
  up.title = "good reply";
  up.textContent = "👍";
  const down = document.createElement("button");
  down.className = "rate-down";
  down.title = "bad reply";
  down.textContent = "👎";
  const fixToggle = document.createElement("button");
  fixToggle.className = "fix-toggle";
  fixToggle.textContent = "Suggest a better reply";
  const status = document.createElement("span");
  status.className = "meta status";
  tools.append(up, down, fixToggle, status);

  const fix = document.createElement("div");
  fix.className = "fix";
  const fixText = document.createElement("textarea");
  fixText.placeholder = "What should the bot have said?";
  const fixSend = document.createElement("button");
  fixSend.className = "fix-send";
  fixSend.textContent = "Send correction";
  fix.append(fixText, fixSend);

  async function rate(which) {
    // Clicking the chosen rating again removes it.
    const current = bubble.dataset.rating || null;
    const rating = current === which ? null : which;
    try {
      await sendFeedback(exchangeId, { rating });
      bubble.dataset.rating = rating || "";
      up.classList.toggle("on", rating === "up");
      down.classList.toggle("on", rating === "down");
      status.textContent = rating ? "thanks!" : "rating removed";
    } catch (e) {
      status.textContent = "⚠ " + e.message;
    }
  }
  up.addEventListener("click", () => rate("up"));
  down.addEventListener("click", () => rate("down"));
  fixToggle.addEventListener("click", () => {
    fix.classList.toggle("open");
    if (fix.classList.contains("open")) fixText.focus();
  });
  fixSend.addEventListener("click", async () => {
    const text = fixText.value.trim();
    if (!text) return;
    try {
      const out = await sendFeedback(exchangeId, { correction: text });
      fix.classList.remove("open");
      fixText.value = "";
      status.textContent = out.correction.status === "pending"
        ? "correction saved — an admin will review it before I learn it. Thanks!"
        : "correction saved — thanks!";
    } catch (e) {
      status.textContent = "⚠ " + e.message;
    }
  });
  bubble.append(tools, fix);
}

// One Server-Sent Events stream of chat.completion.chunk objects.
async function readStream(resp, onChunk) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onChunk(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  busy = true;
  sendButton.disabled = true;
  add("user", text);
  const bubble = add("bot streaming", "");
  const out = bubble.querySelector(".text");
  let reply = "";
  let exchangeId = null;
  let failed = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Tuneloop-Client": "web",
                 "X-Conversation-Id": conversation },
      body: JSON.stringify({
        model, stream: true, stream_options: { include_usage: true }, user,
        conversation_id: conversation,
        messages: history.concat([{ role: "user", content: text }]),
      }),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readStream(resp, (chunk) => {
      if (chunk.error) {
        failed = chunk.error.message;
        return;
      }
      if (chunk.exchange_id) exchangeId = chunk.exchange_id;
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          reply += choice.delta.content;
          out.textContent = reply;
          log.scrollTop = log.scrollHeight;
        }
      }
    });
  } catch (e) {
    failed = e.message;
  }
  bubble.classList.remove("streaming");
  if (failed) {
    bubble.remove();
    showError(failed);
  } else {
    if (!reply) out.textContent = "(empty reply)";
    history.push({ role: "user", content: text }, { role: "assistant", content: reply });
    if (exchangeId) addTools(bubble, exchangeId);
  }
  busy = false;
  sendButton.disabled = false;
  input.focus();
}

$("#send").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text || busy) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("#send").requestSubmit();
  }
});
$("#new").addEventListener("click", newConversation);

fetch("/v1/models")
  .then((r) => r.json())
  .then((body) => {
    model = body.data[0].id;
    $("#model").textContent = "model " + model;
  })
  .catch(() => { $("#model").textContent = "model unknown"; });

newConversation();
