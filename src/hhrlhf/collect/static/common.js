"use strict";
// Shared by the collect pages: the CSRF token, idempotency keys, writes that retry with the
// same key (a retried submit is stored once), and turns shown as text (never as HTML).
window.collect = (function () {
  const csrf = document.querySelector('meta[name="csrf"]').content;
  const $ = (id) => document.getElementById(id);
  const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

  function newKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);  // also on plain http, unlike crypto.randomUUID
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function setSave(text, cls) {
    const el = $("save-state");
    el.textContent = text;
    el.className = "save-state " + (cls || "");
  }

  function showError(message) {
    const el = $("error");
    el.textContent = message || "";
    el.hidden = !message;
  }

  async function post(path, body) {
    body.key = body.key || newKey();
    for (let attempt = 0; ; attempt++) {
      let r;
      try {
        r = await fetch(path, {
          method: "POST", credentials: "same-origin", body: JSON.stringify(body),
          headers: {"content-type": "application/json", "x-csrf-token": csrf},
        });
      } catch (e) {
        if (attempt >= 6) throw new Error("not saved: the server cannot be reached");
        setSave("not saved yet; retrying…", "retry");
        await sleep(400 * 2 ** attempt);
        continue;
      }
      if ((r.status === 429 || r.status >= 502) && attempt < 6) {
        setSave("not saved yet; retrying…", "retry");
        await sleep(1000 * (Number(r.headers.get("retry-after")) || 1));
        continue;
      }
      const data = await r.json().catch(() => ({}));
      if (!r.ok) {
        const err = new Error(data.detail || "error " + r.status);
        err.status = r.status;
        throw err;
      }
      return data;
    }
  }

  async function getJSON(path) {
    const r = await fetch(path, {credentials: "same-origin"});
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(data.detail || "error " + r.status);
    return data;
  }

  function turnsInto(container, turns) {
    container.replaceChildren();
    for (const t of turns) {
      const div = document.createElement("div");
      div.className = "turn " + (t.role === "human" ? "human" : "assistant");
      const role = document.createElement("span");
      role.className = "role";
      role.textContent = t.role === "human" ? "Human" : "Assistant";
      const text = document.createElement("div");
      text.className = "text";
      text.textContent = t.text;
      div.append(role, text);
      container.append(div);
    }
  }

  return {csrf, $, sleep, newKey, setSave, showError, post, getJSON, turnsInto};
})();
