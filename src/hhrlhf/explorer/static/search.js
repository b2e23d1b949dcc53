// The search page: reads the filters from the URL, asks /api/search, shows the results.
// Every text from the data goes into the page through textContent, never as HTML.
(function () {
  "use strict";
  const form = document.getElementById("search-form");
  const statusEl = document.getElementById("status");
  const noteEl = document.getElementById("note");
  const errorEl = document.getElementById("error");
  const list = document.getElementById("results");
  const pager = document.getElementById("pager");
  const WHERE = {context: "context", chosen: "chosen", rejected: "rejected",
                 transcript: "transcript", task_description: "task"};

  function nonEmpty(pairs) {
    const out = new URLSearchParams();
    for (const [k, v] of pairs) if (String(v).trim() !== "") out.append(k, v);
    return out;
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  // Submitting the form starts again at page 1 with only the filters that are set.
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    const params = nonEmpty(new FormData(form));
    if (params.get("per_page") === "20") params.delete("per_page");
    window.location.search = params.toString();
  });
  // Changing a filter searches at once.
  form.querySelectorAll("select").forEach(function (s) {
    s.addEventListener("change", function () { form.requestSubmit(); });
  });

  function showError(message) {
    errorEl.textContent = message;
    errorEl.hidden = false;
    statusEl.textContent = "";
  }

  function pageLink(params, page, label) {
    const p = new URLSearchParams(params);
    if (page === 1) p.delete("page"); else p.set("page", String(page));
    const a = el("a", null, label);
    a.href = "/search?" + p.toString();
    return a;
  }

  function render(data, params) {
    statusEl.textContent = data.total.toLocaleString("en") + " result" +
      (data.total === 1 ? "" : "s") + (data.total ? " · page " + data.page + " of " + data.pages : "") +
      " · sorted by " + data.sort + (data.ranked ? "" : (data.sort === "relevance" ? " (not ranked)" : "")) +
      " · " + data.took_ms + " ms";
    noteEl.hidden = !data.note;
    noteEl.textContent = data.note || "";
    list.replaceChildren();
    list.start = (data.page - 1) * data.per_page + 1;
    for (const hit of data.results) {
      const li = el("li", "hit");
      const head = el("div", "hit-head");
      const a = el("a", "hit-link", hit.source + " #" + hit.index);
      a.href = hit.url;
      head.append(a);
      head.append(el("span", "badge", hit.kind === "pairs" ? "pair" : "red team"));
      head.append(el("span", "badge", hit.num_turns + " turns"));
      if (hit.kind === "redteam") {
        head.append(el("span", "badge", hit.model_type + " " + hit.num_params));
        head.append(el("span", "badge", "rating " + hit.rating));
        head.append(el("span", "badge", "harmlessness " + hit.min_harmlessness_score.toFixed(2)));
        head.append(el("span", "badge", hit.is_upworker ? "Upwork" : "MTurk"));
      }
      for (const f of hit.flags) head.append(el("span", "badge flag", f));
      li.append(head);
      const snip = el("p", "snippet");
      // Where the passage is: the context, the chosen or the rejected response, ...
      snip.append(el("span", "where " + hit.snippet_field, WHERE[hit.snippet_field] || hit.snippet_field));
      for (const [text, isHit] of hit.snippet) {
        snip.append(isHit ? el("mark", "hit", text) : document.createTextNode(text));
      }
      li.append(snip);
      list.append(li);
    }
    pager.replaceChildren();
    if (data.pages > 1) {
      if (data.page > 1) pager.append(pageLink(params, data.page - 1, "← previous"));
      for (const n of pageNumbers(data.page, data.pages)) {
        if (n === null) pager.append(el("span", "gap", "…"));
        else if (n === data.page) pager.append(el("span", "current", n.toLocaleString("en")));
        else pager.append(pageLink(params, n, n.toLocaleString("en")));
      }
      if (data.page < data.pages) pager.append(pageLink(params, data.page + 1, "next →"));
    }
    if (data.total) {
      pager.append(el("span", "total", "results " + data.first.toLocaleString("en") + "–" +
        data.last.toLocaleString("en") + " of " + data.total.toLocaleString("en")));
    }
  }

  // The first and last pages, and two either side of the current one; null marks a gap.
  function pageNumbers(page, pages) {
    const shown = new Set([1, pages]);
    for (let n = page - 2; n <= page + 2; n++) if (n >= 1 && n <= pages) shown.add(n);
    const sorted = Array.from(shown).sort(function (a, b) { return a - b; });
    const out = [];
    for (let i = 0; i < sorted.length; i++) {
      if (i && sorted[i] - sorted[i - 1] === 2) out.push(sorted[i] - 1);  // a gap of one page
      else if (i && sorted[i] - sorted[i - 1] > 2) out.push(null);
      out.push(sorted[i]);
    }
    return out;
  }

  async function run() {
    const params = nonEmpty(new URLSearchParams(window.location.search));
    statusEl.textContent = "Searching…";
    let response, data;
    try {
      response = await fetch("/api/search?" + params.toString(), {headers: {Accept: "application/json"}});
      data = await response.json();
    } catch (e) {
      showError("The server did not answer: " + e);
      return;
    }
    if (!response.ok) {
      showError(typeof data.detail === "string" ? data.detail : "error " + response.status);
      return;
    }
    render(data, params);
  }

  run();
})();
