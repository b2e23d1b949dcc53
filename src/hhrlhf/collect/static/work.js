"use strict";
// The comparison and red-team page: the conversation so far, the streamed response(s), the
// pick (keys 1-4) or the rating; all of it reloaded from /api/state, so a reload resumes.
(function () {
  const {$, post, getJSON, setSave, showError, turnsInto, newKey, csrf} = window.collect;
  const task = document.querySelector('meta[name="task"]').content;
  const compare = task !== "redteam";
  let state = null;
  let busy = false;
  let streaming = false;
  let shownAt = 0;

  function segmentsInto(el, segments) {
    el.replaceChildren();
    for (const [text, changed] of segments) {
      if (changed) {
        const mark = document.createElement("mark");
        mark.className = "diff side";
        mark.textContent = text;
        el.append(mark);
      } else {
        el.append(document.createTextNode(text));
      }
    }
  }

  function render() {
    turnsInto($("conversation"), state.turns);
    $("overlap-note").hidden = state.mode !== "overlap";
    const item = state.item;
    if (compare) {
      $("responses").hidden = !item && !streaming;
      $("pick").hidden = !item;
      $("skip").hidden = state.mode !== "overlap";
      if (item) {
        segmentsInto($("left-text"), item.left_segments);
        segmentsInto($("right-text"), item.right_segments);
        shownAt = Date.now();
      }
    } else {
      $("single").hidden = !streaming;
    }
    const waiting = Boolean(item) || state.needs_response || streaming;
    $("compose").hidden = state.mode === "overlap";
    $("message").disabled = waiting;
    $("send").disabled = waiting;
    const done = state.done || {};
    $("counts").textContent = compare
      ? `${done.judgements || 0} comparisons saved`
      : `${done.attempts || 0} attempts saved`;
    if (state.needs_response && !streaming) respond();
  }

  async function load() {
    try {
      state = await getJSON("/api/state");
      render();
    } catch (e) {
      showError(e.message);
    }
  }

  function handleEvent(chunk) {
    let event = "message";
    let data = "";
    for (const line of chunk.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data += line.slice(5).trim();
    }
    if (!data) return;
    const payload = JSON.parse(data);
    if (event === "delta") {
      $(payload.side + "-text").append(document.createTextNode(payload.text));
    } else if (event === "done") {
      streaming = false;
      state = payload;
      setSave(compare ? "pick one" : "ready", "ok");
      render();
    } else if (event === "error") {
      streaming = false;
      showError(payload.detail);
      setSave("no response", "retry");
    }
  }

  async function respond() {
    streaming = true;
    showError("");
    setSave("the assistant is writing…", "busy");
    for (const id of compare ? ["left-text", "right-text"] : ["single-text"]) {
      $(id).replaceChildren();
    }
    if (compare) { $("responses").hidden = false; $("pick").hidden = true; }
    else { $("single").hidden = false; }
    try {
      const r = await fetch("/api/respond", {
        method: "POST", credentials: "same-origin",
        headers: {"content-type": "application/json", "x-csrf-token": csrf},
        body: JSON.stringify({conversation_id: state.conversation_id, key: newKey()}),
      });
      if (!r.ok) {
        const data = await r.json().catch(() => ({}));
        throw new Error(data.detail || "error " + r.status);
      }
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          handleEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
        }
      }
    } catch (e) {
      showError(e.message);
      setSave("no response", "retry");
    } finally {
      streaming = false;
    }
  }

  async function send(event) {
    event.preventDefault();
    const text = $("message").value;
    if (!text.trim() || busy || !state) return;
    busy = true;
    showError("");
    setSave("saving…", "busy");
    try {
      const res = await post("/api/message", {
        conversation_id: state.conversation_id, position: state.turns.length, text,
      });
      $("message").value = "";
      setSave("saved", "ok");
      state.conversation_id = res.conversation_id;
      state.turns.push({role: "human", text: text.trim()});
      state.needs_response = true;
      render();
    } catch (e) {
      showError(e.message);
      setSave("not saved", "retry");
      if (e.status === 409) load();
    } finally {
      busy = false;
    }
  }

  async function pick(side, strength) {
    if (busy || !state || !state.item) return;
    busy = true;
    showError("");
    setSave("saving…", "busy");
    try {
      await post("/api/judge", {item_id: state.item.id, side, strength, shown_ms: shownAt});
      setSave("saved", "ok");
      state.item = null;
      await load();
      if (!$("message").disabled) $("message").focus();
    } catch (e) {
      showError(e.message);
      setSave("not saved", "retry");
      if (e.status === 409) load();
    } finally {
      busy = false;
    }
  }

  async function newConversation() {
    if (busy || !state) return;
    busy = true;
    try {
      if (state.conversation_id !== null) {
        await post("/api/finish", {conversation_id: state.conversation_id});
      }
      setSave("saved; new conversation", "ok");
      await load();
    } catch (e) {
      showError(e.message);
    } finally {
      busy = false;
    }
  }

  async function submitAttempt(event) {
    event.preventDefault();
    const checked = document.querySelector('input[name="rating"]:checked');
    if (!checked) { showError("pick a rating from 0 to 4"); return; }
    if (busy) return;
    busy = true;
    setSave("saving…", "busy");
    try {
      await post("/api/attempt", {
        conversation_id: state.conversation_id, rating: Number(checked.value),
        task_description: $("task-description").value,
      });
      setSave("attempt saved", "ok");
      $("rate").hidden = true;
      $("rate").reset();
      showError("");
      await load();
    } catch (e) {
      showError(e.message);
      setSave("not saved", "retry");
    } finally {
      busy = false;
    }
  }

  $("compose").addEventListener("submit", send);
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
  });
  if (compare) {
    for (const b of document.querySelectorAll("button.choice")) {
      b.addEventListener("click", () => pick(b.dataset.side, Number(b.dataset.strength)));
    }
    $("skip").addEventListener("click", () => pick("skip", 0));
    $("new-conversation").addEventListener("click", newConversation);
    const keys = {"1": ["left", 2], "2": ["left", 1], "3": ["right", 1], "4": ["right", 2]};
    document.addEventListener("keydown", (e) => {
      const tag = (document.activeElement || {}).tagName;
      if (tag === "TEXTAREA" || tag === "INPUT" || !(e.key in keys) || $("pick").hidden) return;
      e.preventDefault();
      pick(...keys[e.key]);
    });
  } else {
    $("end-attempt").addEventListener("click", () => {
      if (!state.conversation_id) { showError("write to the assistant first"); return; }
      $("rate").hidden = false;
      $("compose").hidden = true;
    });
    $("cancel-rate").addEventListener("click", () => { $("rate").hidden = true; render(); });
    $("rate").addEventListener("submit", submitAttempt);
  }
  load();
})();
