// The workbench pages' script: reads the JSON API with the key typed on the page
// (sessionStorage, or localStorage when "remember" is ticked; sent as a bearer
// header, never in a URL) and redraws by polling. No framework, no build step.
"use strict";

(function () {
  const KEY_NAME = "executor-service.dispatcher-key";
  const body = document.body;
  const pollMs = Number(body.dataset.pollMs || 1000);
  const $ = (id) => document.getElementById(id);

  // -- the key ----------------------------------------------------------------
  function getKey() {
    return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME) || "";
  }
  function setKey(key, remember) {
    sessionStorage.removeItem(KEY_NAME);
    localStorage.removeItem(KEY_NAME);
    (remember ? localStorage : sessionStorage).setItem(KEY_NAME, key);
  }
  function forgetKey() {
    sessionStorage.removeItem(KEY_NAME);
    localStorage.removeItem(KEY_NAME);
  }

  class Unauthorized extends Error {}

  async function api(method, path, payload) {
    const headers = { Accept: "application/json" };
    const key = getKey();
    if (key) headers.Authorization = "Bearer " + key;
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (payload !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(payload);
    }
    const response = await fetch(path, init);
    if (response.status === 401) throw new Unauthorized("the API wants a key");
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const err = data.error || {};
      throw new Error((err.code || "HTTP " + response.status) + ": " + (err.message || ""));
    }
    return data;
  }

  function askForKey(message) {
    $("key-form").hidden = false;
    $("key-error").textContent = message || "";
    $("key-input").focus();
  }

  function showKeyState() {
    const has = Boolean(getKey());
    $("forget-key").hidden = !has;
    $("key-status").textContent = has ? "key set" : "";
  }

  // -- small DOM helpers ---------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("data-")) node.setAttribute(name, value);
      else node[name] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  function pct(x) { return (100 * x).toFixed(0) + "%"; }
  function seconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 60) return s.toFixed(0) + " s";
    if (s < 3600) return (s / 60).toFixed(1) + " min";
    return (s / 3600).toFixed(1) + " h";
  }
  // An ETA, or "unknown" when the API says it cannot tell (eta_unknown: why).
  function eta(x) { return x.eta_s === null && x.eta_unknown ? "unknown" : seconds(x.eta_s); }
  function money(x) { return x >= 1 ? x.toFixed(2) : x.toPrecision(3); }
  function errorText(err) {
    if (!err) return "";
    return (err.code || "error") + (err.message ? ": " + err.message : "");
  }

  // A bar of succeeded / dead / cancelled / in progress segments.
  function bar(counts, total) {
    const outer = el("div", { class: "bar", title: "" });
    for (const name of ["succeeded", "dead", "cancelled"]) {
      const n = counts[name] || 0;
      if (n && total) outer.append(el("span", { class: "seg " + name, style: "" }));
      if (n && total) outer.lastChild.style.width = (100 * n / total) + "%";
    }
    return outer;
  }

  // -- the job page --------------------------------------------------------------
  // Why a region's work waits (GET /jobs/<id> "waiting"): per model, its circuit (since
  // when, after which failure), a rate-limit wait, adaptive concurrency or a budget.
  function waitingText(job, region) {
    const models = (job.waiting || {})[region] || {};
    return Object.entries(models).map(([model, w]) => {
      const until = w.not_before || w.circuit_open_until;
      const when = until ? " until " + new Date(until * 1000).toLocaleTimeString() : "";
      return model + ": " + w.reason + when;
    }).join("; ");
  }

  function regionRow(region, job, queue) {
    const q = (queue && queue.regions || []).find((r) => r.region === region.region) || {};
    const circuit = q.circuit || "";
    const waiting = waitingText(job, region.region);
    return el("tr", { "data-region": region.region },
      el("td", {}, region.region),
      el("td", { class: "bar-col" }, bar(region, region.total),
        el("span", { class: "bar-label", text: pct(region.fraction) + " succeeded" })),
      el("td", { class: "num" }, region.succeeded),
      el("td", { class: "num" + (region.dead ? " bad" : "") }, region.dead),
      el("td", { class: "num" }, region.cancelled),
      el("td", { class: "num" }, region.in_progress),
      el("td", { class: "num" + (waiting && region.eta_s === null && region.eta_unknown ? " bad" : ""),
        title: region.eta_unknown || "" }, region.in_progress ? eta(region) : "done"),
      el("td", { class: circuit === "closed" ? "" : "bad" }, circuit),
      el("td", { class: waiting ? "waiting bad" : "waiting" }, waiting));
  }

  function drawProgress(job, queue) {
    $("job-name").textContent = job.name || "job";
    const state = $("job-state");
    state.textContent = job.state;
    state.className = "badge " + job.state;
    const tags = (job.tags || []).join(", ");
    $("job-summary").textContent =
      job.questions + " questions × " + job.models.join(", ") + (job.samples > 1 ? " × " + job.samples + " samples" : "") +
      " · failover " + job.failover + (tags ? " · tags: " + tags : "") +
      " · submitted " + new Date(job.created_at * 1000).toLocaleString();
    const p = job.progress;
    const overall = $("overall");
    overall.replaceChildren(
      bar(p, p.total),
      el("p", { id: "overall-label", class: "big" },
        pct(p.fraction) + " succeeded",
        el("span", { class: "muted" },
          " · " + p.succeeded + " succeeded, " + p.dead + " dead, " + p.cancelled + " cancelled, " +
          p.in_progress + " in progress of " + p.total +
          (p.in_progress ? " · ETA " + eta(job) +
            (job.eta_s === null && job.eta_unknown ? " (" + job.eta_unknown + ")" : "") : ""))));
    const tbody = $("regions-table").tBodies[0];
    tbody.replaceChildren(...job.regions.map((r) => regionRow(r, job, queue)));
    if (queue) {
      const waiting = (queue.regions || []).filter((r) => r.retry_wait).map((r) => r.region + " " + r.retry_wait);
      $("retry-queue").textContent = "Global retry queue: " + queue.global_retry +
        (waiting.length ? " · retries waiting per region: " + waiting.join(", ") : "") +
        " · dead (all jobs): " + queue.dead;
    }
  }

  async function retry(jobId, payload, button) {
    if (button) button.disabled = true;
    try {
      const result = await api("POST", "/jobs/" + jobId + "/retry", payload);
      $("notice").textContent = "re-queued " + result.requeued + " executions";
      compared = { key: null, at: -Infinity };  // the dead letters changed: read them now
      loop();  // redraw now, and poll at the running pace again
    } catch (err) {
      $("notice").textContent = "retry failed: " + err.message;
      if (button) button.disabled = false;
    }
  }

  // Dead letters, one row per (model, requested region): the retry API re-queues by
  // region and model, so that is what one button re-runs.
  function drawDead(jobId, grid) {
    const groups = new Map();
    for (const m of grid.models) {
      for (const row of m.rows) {
        for (const [region, cell] of Object.entries(row.cells)) {
          if (cell.state !== "dead") continue;
          const key = m.model + "\u0000" + region;
          if (!groups.has(key)) groups.set(key, { model: m.model, region, cells: [] });
          groups.get(key).cells.push({ row, cell });
        }
      }
    }
    let total = 0;
    const rows = [...groups.values()].map((g) => {
      total += g.cells.length;
      const last = g.cells[g.cells.length - 1].cell;
      const button = el("button", {
        type: "button", class: "retry", text: "Retry " + g.cells.length,
        "data-region": g.region, "data-model": g.model,
        title: "re-queue the dead executions of " + g.model + " in " + g.region,
      });
      button.addEventListener("click", () =>
        retry(jobId, { regions: [g.region], models: [g.model] }, button));
      const questions = el("ul", { class: "questions" }, ...g.cells.map(({ row }) =>
        el("li", { text: row.question + (row.sample ? " (sample " + row.sample + ")" : "") })));
      return el("tr", { class: "dead", "data-region": g.region, "data-model": g.model },
        el("td", {}, g.model),
        el("td", {}, g.region),
        el("td", { class: "num bad" }, g.cells.length),
        el("td", {}, questions),
        el("td", { class: "num" }, last.attempts),
        el("td", { class: "error" }, errorText(last.error)),
        el("td", {}, button));
    });
    $("dead-table").tBodies[0].replaceChildren(...rows);
    $("dead-count").textContent = String(total);
    $("retry-all").hidden = total === 0;
    $("dead-letters").classList.toggle("empty", total === 0);
  }

  function answerNode(cell) {
    const node = el("div", { class: "answer" });
    if (cell.segments) {
      for (const s of cell.segments) node.append(s.changed ? el("mark", { text: s.text }) : s.text);
    } else if (cell.state === "succeeded") {
      node.textContent = cell.output || "";
    } else {
      // the error in full is in the dead letters (and the tooltip); the grid stays readable
      node.append(el("span", {
        class: "muted", text: cell.state + (cell.error ? " · " + (cell.error.code || "error") : ""),
        title: errorText(cell.error),
      }));
    }
    if (cell.refusal) node.prepend(el("span", { class: "badge refusal", text: "refusal: " + cell.refusal }), " ");
    if (cell.executed_region && cell.state === "succeeded" && cell.executed_region !== cell.requested_region && cell.requested_region) {
      node.append(el("div", { class: "muted", text: "ran in " + cell.executed_region }));
    }
    return node;
  }

  function drawCompare(grid) {
    const out = [];
    for (const m of grid.models) {
      const head = el("tr", {}, el("th", { text: "question" }), el("th", { text: "verdict" }),
        ...m.regions.map((r) => el("th", { text: r })));
      const rows = m.rows.map((row) => {
        let verdict;
        if (row.differs) verdict = el("span", { class: "badge differs", text: "differs" + (row.similarity === null ? "" : " · " + pct(row.similarity) + " alike") });
        else if (row.exact_match) verdict = el("span", { class: "badge same", text: "same" });
        else verdict = el("span", { class: "badge incomplete", text: "incomplete" });
        return el("tr", { class: row.differs ? "differs" : "", "data-question": row.question_index, "data-sample": row.sample },
          el("td", { class: "question" }, row.question, row.sample ? el("div", { class: "muted", text: "sample " + row.sample }) : null),
          el("td", {}, verdict),
          ...m.regions.map((r) => {
            const cell = row.cells[r];
            if (cell) cell.requested_region = r;
            return el("td", { class: "cell " + (cell ? cell.state : "") }, cell ? answerNode(cell) : "");
          }));
      });
      out.push(el("h3", {}, m.model + " ", el("span", { class: "muted", text: m.rows_differing + " of " + m.rows.length + " rows differ" })),
        el("table", { class: "grid compare", "data-model": m.model }, el("thead", {}, head), el("tbody", {}, ...rows)));
    }
    $("compare-grids").replaceChildren(...out);
  }

  function usageRow(scope, t) {
    return el("tr", {}, el("td", { text: scope }), el("td", { class: "num", text: t.executions }),
      el("td", { class: "num", text: t.prompt_tokens }), el("td", { class: "num", text: t.completion_tokens }),
      el("td", { class: "num", text: t.cost_usd === null ? "–" : "$" + money(t.cost_usd) }));
  }

  function drawUsage(usage) {
    const rows = [usageRow("job", usage.job)];
    for (const [region, t] of Object.entries(usage.by_region)) rows.push(usageRow("region " + region, t));
    for (const [model, t] of Object.entries(usage.by_model)) rows.push(usageRow("model " + model, t));
    $("usage-table").tBodies[0].replaceChildren(...rows);
  }

  // The comparison is the costly read (every answer, diffed): it is asked for only
  // when the counts moved, and while the job runs at most every COMPARE_EVERY polls.
  const COMPARE_EVERY = 5;
  let compared = { key: null, at: -Infinity };
  let polls = 0;

  async function refreshJob(jobId) {
    polls += 1;
    const [job, queue] = await Promise.all([
      api("GET", "/jobs/" + jobId),
      api("GET", "/queue").catch(() => null),
    ]);
    drawProgress(job, queue);
    const p = job.progress;
    const key = [p.succeeded, p.dead, p.cancelled, p.in_progress].join("/");
    const due = p.in_progress === 0 || polls - compared.at >= COMPARE_EVERY;
    if (key !== compared.key && due) {
      const grid = await api("GET", "/jobs/" + jobId + "/compare");
      compared = { key, at: polls };
      drawDead(jobId, grid);
      drawCompare(grid);
      drawUsage(grid.usage);
    }
    document.title = pct(p.fraction) + " · " + (job.name || "job " + jobId);
    return job;
  }

  // -- the jobs list ----------------------------------------------------------------
  let cursor = null;
  async function refreshJobs(append) {
    const params = new URLSearchParams();
    if ($("filter-state").value) params.set("state", $("filter-state").value);
    if ($("filter-name").value) params.set("name", $("filter-name").value);
    if (append && cursor) params.set("cursor", cursor);
    const page = await api("GET", "/jobs?" + params.toString());
    const rows = page.jobs.map((job) => el("tr", { "data-job-id": job.id },
      el("td", { text: new Date(job.created_at * 1000).toLocaleString() }),
      el("td", {}, el("a", { href: "/jobs/" + job.id + "/view", text: job.name || "(unnamed)" })),
      el("td", { text: (job.tags || []).join(", ") }),
      el("td", {}, el("span", { class: "badge " + job.state, text: job.state })),
      el("td", {}, bar(job.progress, job.progress.total), el("span", { class: "bar-label", text: pct(job.progress.fraction) })),
      el("td", { text: job.models.join(", ") }),
      el("td", {}, el("code", { text: job.id }))));
    const tbody = $("jobs-table").tBodies[0];
    if (append) tbody.append(...rows); else tbody.replaceChildren(...rows);
    cursor = page.next_cursor;
    $("jobs-more").hidden = !cursor;
  }

  // -- the loop ---------------------------------------------------------------------
  let settled = false;  // the job has nothing left to run: poll less often
  async function tick() {
    try {
      if (body.dataset.page === "job") {
        const job = await refreshJob(body.dataset.jobId);
        settled = job.progress.in_progress === 0;
      }
      else if (body.dataset.page === "jobs") await refreshJobs(false);
      $("key-form").hidden = true;
      $("status").textContent = "updated " + new Date().toLocaleTimeString();
      body.dataset.loaded = "true";
    } catch (err) {
      if (err instanceof Unauthorized) {
        askForKey(getKey() ? "that key was refused" : "");
        return false;
      }
      $("status").textContent = "could not update: " + err.message;
    }
    return true;
  }

  let timer = null;
  async function loop() {
    clearTimeout(timer);
    const ok = await tick();
    showKeyState();
    // the job list is refreshed on demand; the job page live, even once finished
    // (a retry, here or from the CLI, starts it again)
    if (ok && body.dataset.page === "job") timer = setTimeout(loop, settled ? 5 * pollMs : pollMs);
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setKey($("key-input").value.trim(), $("key-remember").checked);
    $("key-input").value = "";
    loop();
  });
  $("forget-key").addEventListener("click", () => { forgetKey(); showKeyState(); askForKey(""); });
  if (body.dataset.page === "job") {
    $("retry-all").addEventListener("click", (e) => retry(body.dataset.jobId, {}, e.target));
  }
  if (body.dataset.page === "jobs") {
    $("jobs-filter").addEventListener("submit", (e) => { e.preventDefault(); refreshJobs(false); });
    $("jobs-more").addEventListener("click", () => refreshJobs(true));
  }
  loop();
})();
