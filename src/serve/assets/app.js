// caudal dashboard: renders /api/snapshot, then every snapshot pushed on /events
// (server-sent events; the browser reconnects by itself). No framework, no CDN.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const palette = ["#2f6fde", "#e8710a", "#1a7f37", "#c62828", "#8e44ad", "#00838f", "#6d4c41", "#d81b60", "#546e7a", "#7cb342"];
  const nf = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const nf1 = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
  let money = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  const charts = {};
  // What tests and curious users can read: updates received and points charted.
  window.caudal = { updates: 0, points: 0, snapshot: null, quarantineReason: null };

  const isMoney = (m) => /revenue|amount|total|price|sales/i.test(m);
  // Decimals travel as exact strings; Number() is for display and charts only.
  const fmt = (m, v) => (v === null || v === undefined || v === "" ? "–" : isMoney(m) ? money.format(Number(v)) : nf.format(Number(v)));
  const esc = (s) => String(s ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
  const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  const ago = (s) => (s < 1 ? "now" : s < 90 ? nf.format(s) + " s ago" : s < 5400 ? nf.format(s / 60) + " min ago" : nf1.format(s / 3600) + " h ago");

  // Axis ticks: short ("PEN 1.2M", "12K"); the page's other numbers are in full.
  const compact = (m) => {
    const f = isMoney(m) && money.resolvedOptions().currency
      ? new Intl.NumberFormat(undefined, { notation: "compact", style: "currency", currency: money.resolvedOptions().currency, maximumFractionDigits: 1 })
      : new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
    return (v) => f.format(v);
  };

  function chart(id, title, xs, series, valueFmt, windowSecs) {
    const el = $(id);
    if (!el) return;
    const width = Math.max(260, el.clientWidth || 300);
    const data = [xs.map((x) => x / 1000), ...series.map((s) => s.values.map(Number))];
    window.caudal.points += xs.length * series.length;
    const key = series.map((s) => s.label).join("|");
    const existing = charts[id];
    if (existing && existing.key === key && Math.abs(existing.plot.width - width) < 2) {
      existing.plot.setData(data);
      return;
    }
    if (existing) existing.plot.destroy();
    const opts = {
      width, height: 220, legend: { live: false },
      // One window alone would make uPlot span years: pad the range by a window.
      scales: { x: { time: true, range: (u, min, max) => (max - min < windowSecs ? [min - windowSecs, max + windowSecs] : [min, max]) } },
      axes: [{}, { size: 78, values: (u, ticks) => ticks.map((t) => valueFmt(t)) }],
      series: [{}, ...series.map((s, i) => ({ label: s.label, stroke: palette[i % palette.length], width: 2, points: { size: 4 } }))],
    };
    charts[id] = { key, plot: new uPlot(opts, data, el) };
  }

  function renderBusiness(snap) {
    const g = snap.business && snap.business[0];
    if (!g) return;
    const money_m = g.measures.find(isMoney) || g.measures[g.measures.length - 1];
    const counts = g.measures.filter((m) => !isMoney(m));
    $("chart-total-title").textContent = `${money_m} per ${g.window_minutes}-minute window`;
    const w = g.window_minutes * 60;
    chart("chart-total", money_m, g.windows, [{ label: money_m, values: g.totals[money_m] || [] }], compact(money_m), w);
    g.group_by.slice(0, 2).forEach((col, i) => {
      const title = $(i === 0 ? "chart-channel-title" : "chart-category-title");
      if (title) title.textContent = `${money_m} by ${col}`;
      const byValue = g.split[col] || {};
      const series = Object.keys(byValue).sort().map((v) => ({ label: v || "(none)", values: byValue[v][money_m] || [] }));
      chart("chart-split-" + i, col, g.windows, series, compact(money_m), w);
    });
    chart("chart-counts", "counts", g.windows, counts.map((m) => ({ label: m, values: g.totals[m] || [] })), compact("count"), w);

    const kpis = g.current.map((c) => {
      const pct = c.change_percent === null ? null : Number(c.change_percent);
      const trend = pct === null ? "" : `<span class="${pct >= 0 ? "up" : "down"}">${pct >= 0 ? "▲" : "▼"} ${nf1.format(Math.abs(pct))}%</span>`;
      return `<div class="kpi"><div class="label">${esc(c.measure)}</div>
        <div class="value" id="kpi-${esc(c.measure)}" data-value="${esc(c.value)}">${fmt(c.measure, c.value)}</div>
        <div class="sub">${trend} previous ${fmt(c.measure, c.previous)}</div></div>`;
    });
    $("business-kpis").innerHTML = kpis.join("") || '<span class="muted">no gold rows yet</span>';
    if (g.current[0]) {
      const w = g.current[0].window_ms;
      $("window-label").textContent = `${clock(w)}–${clock(w + g.window_minutes * 60000)} UTC ${new Date(w).toISOString().slice(0, 10)}`;
    }
  }

  function rows(id, head, body) {
    $(id).innerHTML = `<tr>${head.map((h) => `<th class="${h.n ? "n" : ""}">${esc(h.t)}</th>`).join("")}</tr>` +
      (body.length ? body.join("") : `<tr><td colspan="${head.length}" class="muted">none</td></tr>`);
  }

  function renderHealth(snap) {
    const h = snap.health || {};
    const ev = $("kpi-events");
    ev.textContent = h.events_total === null || h.events_total === undefined ? "–" : nf.format(h.events_total);
    ev.dataset.value = h.events_total ?? "";
    $("kpi-events-rate").textContent = h.events_per_s === null || h.events_per_s === undefined ? "" : nf1.format(h.events_per_s) + " events/s";
    $("kpi-lag").textContent = h.lag_s === null || h.lag_s === undefined ? "–" : nf1.format(h.lag_s) + " s";
    $("kpi-latency").textContent = h.latency_ms ? `${nf.format(h.latency_ms.p50)} / ${nf.format(h.latency_ms.p99)} ms` : "–";
    $("kpi-latency-sub").textContent = h.latency_ms ? `p90 ${nf.format(h.latency_ms.p90)} ms, max ${nf.format(h.latency_ms.max)} ms` : "source commit → stored";
    const q = snap.quarantine || {};
    $("kpi-quarantine").textContent = nf.format(q.open_total || 0);
    if (h.checkpoint) {
      const at = Date.parse(h.checkpoint.updated_at.replace(" ", "T") + (h.checkpoint.updated_at.endsWith("Z") ? "" : "Z"));
      $("kpi-checkpoint").textContent = isNaN(at) ? h.checkpoint.updated_at : ago((Date.now() - at) / 1000);
      $("kpi-commit").textContent = `${nf.format(h.checkpoint.event_count)} events committed` + (h.last_commit_ms !== null && h.last_commit_ms !== undefined ? `, last commit ${nf.format(h.last_commit_ms)} ms` : "");
    }
    rows("tables", [{ t: "table" }, { t: "events/s", n: 1 }, { t: "events", n: 1 }],
      (h.tables || []).map((t) => `<tr><td>${esc(t.table)}</td><td class="n">${nf1.format(t.per_s)}</td><td class="n">${nf.format(t.events)}</td></tr>`));
    if (!h.in_process) $("tables").innerHTML += '<tr><td colspan="3" class="muted">per-table rates need the pipeline in this process (caudal demo / run --listen)</td></tr>';
    rows("quarantine-reasons", [{ t: "reason" }, { t: "open rows", n: 1 }, { t: "" }],
      (q.by_reason || []).map(([r, n]) => `<tr><td>${esc(r)}</td><td class="n">${nf.format(n)}</td><td><a href="#quarantine" data-reason="${esc(r)}">latest</a></td></tr>`));
    if (!window.caudal.quarantineReason) renderQuarantine(q.latest || [], null);
  }

  function renderQuarantine(items, reason) {
    $("quarantine-filter").innerHTML = reason ? `reason ${esc(reason)} · <a href="#quarantine" data-reason="">all</a> · <a href="/api/quarantine?reason=${encodeURIComponent(reason)}">json</a>` : '<a href="/api/quarantine">json</a>';
    rows("quarantine-latest", [{ t: "id", n: 1 }, { t: "at" }, { t: "table" }, { t: "key" }, { t: "reason" }, { t: "detail / payload" }],
      items.map((r) => `<tr><td class="n">${r.id}</td><td>${esc((r.quarantined_at || "").slice(0, 19))}</td><td>${esc(r.table)}</td><td>${esc(r.key)}</td><td>${esc(r.stage)}/${esc(r.reason)}</td><td>${esc(r.detail)}<pre>${esc(r.payload)}</pre></td></tr>`));
  }

  document.addEventListener("click", async (e) => {
    const a = e.target.closest("a[data-reason]");
    if (!a) return;
    const reason = a.dataset.reason || null;
    window.caudal.quarantineReason = reason;
    if (!reason) return renderQuarantine((window.caudal.snapshot?.quarantine?.latest) || [], null);
    const resp = await fetch(`/api/quarantine?limit=50&reason=${encodeURIComponent(reason)}`);
    if (resp.ok) renderQuarantine(await resp.json(), reason);
  });

  function renderTop(snap) {
    const t = snap.top || {};
    rows("top-products", [{ t: "product" }, { t: "units", n: 1 }, { t: "lines", n: 1 }],
      (t.products || []).map((p) => `<tr><td>${esc(p.name)}</td><td class="n">${nf.format(p.units)}</td><td class="n">${nf.format(p.lines)}</td></tr>`));
    rows("top-cities", [{ t: "city" }, { t: "orders", n: 1 }, { t: "lines", n: 1 }],
      (t.cities || []).map((p) => `<tr><td>${esc(p.name)}</td><td class="n">${nf.format(p.units)}</td><td class="n">${nf.format(p.lines)}</td></tr>`));
  }

  function renderAlerts(snap) {
    const a = snap.alerts || {};
    rows("alert-rules", [{ t: "rule" }, { t: "state" }, { t: "value" }, { t: "condition" }],
      (a.rules || []).map((r) => `<tr><td><span class="badge ${esc(r.severity)}">${esc(r.severity)}</span> ${esc(r.alert)}</td>
        <td>${r.firing ? `<span class="badge critical">firing</span> since ${esc(r.since)}` : '<span class="badge resolved">ok</span>'}</td>
        <td>${esc(r.value ?? "–")}</td><td class="muted">${esc(r.condition)}</td></tr>`));
    rows("alert-history", [{ t: "at" }, { t: "rule" }, { t: "state" }, { t: "value" }],
      (a.history || []).slice(0, 30).map((h) => `<tr><td>${esc(h.at)}</td><td>${esc(h.alert)}</td>
        <td><span class="badge ${h.state === "firing" ? esc(h.severity) : "resolved"}">${esc(h.state)}</span>${h.notified ? "" : ' <span class="muted">(not sent)</span>'}</td><td>${esc(h.value ?? "")}</td></tr>`));
  }

  function render(snap) {
    if (!snap || !snap.pipeline) return;
    window.caudal.snapshot = snap;
    window.caudal.points = 0;
    if (snap.currency) money = new Intl.NumberFormat(undefined, { style: "currency", currency: snap.currency });
    $("pipeline").textContent = snap.pipeline;
    $("store").textContent = snap.store;
    $("updated").textContent = new Date(snap.generated_at_ms).toLocaleTimeString();
    $("store-error").textContent = snap.store_error ? "store: " + snap.store_error : "";
    $("status-dot").className = "dot " + (snap.store_error ? "down" : "live");
    for (const f of [renderBusiness, renderHealth, renderTop, renderAlerts]) {
      try { f(snap); } catch (e) { console.error(e); }
    }
    window.caudal.updates += 1;
  }

  fetch("/api/snapshot").then((r) => r.json()).then(render).catch(() => {});
  const source = new EventSource("/events");
  source.addEventListener("snapshot", (e) => render(JSON.parse(e.data)));
  source.onerror = () => { $("status-dot").className = "dot down"; };
  window.addEventListener("resize", () => window.caudal.snapshot && render(window.caudal.snapshot));
})();
