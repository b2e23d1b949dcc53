"use strict";
// The review page: one finished red-team attempt at a time, tagged with up to 6 tags.
(function () {
  const {$, post, getJSON, setSave, showError, turnsInto} = window.collect;
  let attempt = null;
  let busy = false;

  async function load() {
    try {
      const state = await getJSON("/api/state");
      attempt = state.attempt;
      $("attempt").hidden = !attempt;
      $("nothing").hidden = Boolean(attempt);
      if (!attempt) return;
      $("attempt-id").textContent = String(attempt.attempt_id);
      $("attempt-rating").textContent = String(attempt.rating);
      $("attempt-description").textContent = attempt.task_description;
      turnsInto($("transcript"), attempt.turns);
      $("tags-form").reset();
    } catch (e) {
      showError(e.message);
    }
  }

  $("tags-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    if (busy || !attempt) return;
    const tags = Array.from(document.querySelectorAll('input[name="tag"]:checked'),
                            (b) => b.value);
    for (const t of $("other-tags").value.split(",")) if (t.trim()) tags.push(t.trim());
    busy = true;
    setSave("saving…", "busy");
    try {
      await post("/api/review", {attempt_id: attempt.attempt_id, tags});
      setSave("saved", "ok");
      showError("");
      await load();
    } catch (e) {
      showError(e.message);
      setSave("not saved", "retry");
    } finally {
      busy = false;
    }
  });
  load();
})();
