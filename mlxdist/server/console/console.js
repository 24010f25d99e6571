// The mlxdist web console: chat and cluster views (docs/console.md). Plain JavaScript, no build step.
(() => {
  "use strict";

  const KEY_STORE = "mlxdist.key";
  const CHAT_STORE = "mlxdist.chat";
  const PALETTE = ["#2563eb", "#15803d", "#b45309", "#7c3aed", "#be123c", "#0e7490", "#a21caf", "#4d7c0f"];
  const $ = (sel) => document.querySelector(sel);
  const noop = () => {};

  // ---------- small helpers ----------

  const store = {
    get(k) { try { return localStorage.getItem(k); } catch (e) { return null; } },
    set(k, v) { try { localStorage.setItem(k, v); } catch (e) { /* storage off: memory only */ } },
    del(k) { try { localStorage.removeItem(k); } catch (e) { /* storage off */ } },
  };

  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k === "style") Object.assign(el.style, v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat()) {
      if (kid != null && kid !== false) el.append(kid instanceof Node ? kid : String(kid));
    }
    return el;
  }

  const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);

  function fmtBytes(b) {
    if (b == null || !isFinite(b)) return "?";
    const GB = 1024 ** 3, MB = 1024 ** 2;
    if (b >= GB) return (b / GB).toFixed(b >= 100 * GB ? 0 : 1) + " GB";
    if (b >= MB) return (b / MB).toFixed(b >= 100 * MB ? 0 : 1) + " MB";
    if (b >= 1024) return (b / 1024).toFixed(0) + " KB";
    return b + " B";
  }

  const num = (x, digits) => (x == null || !isFinite(x) ? "–" : Number(x).toFixed(digits));

  // ---------- the API key ----------

  let apiKey = store.get(KEY_STORE) || "";
  try {
    const url = new URL(location.href);
    const given = url.searchParams.get("key");
    if (given !== null) {
      apiKey = given.trim();
      store.set(KEY_STORE, apiKey);
      url.searchParams.delete("key"); // keep the key out of the address bar and history
      history.replaceState(null, "", url.pathname + url.search + url.hash);
    }
  } catch (e) { /* an odd URL: no key from it */ }

  function headers(extra) {
    const out = Object.assign({}, extra);
    if (apiKey) out.Authorization = "Bearer " + apiKey;
    return out;
  }

  function needKey() {
    const form = $("#auth");
    const wasHidden = form.hidden;
    $("#auth-label").textContent = apiKey ? "The API key was refused; enter the right one." : "This server needs an API key.";
    form.hidden = false;
    if (wasHidden && (document.activeElement === document.body || !document.activeElement)) $("#api-key").focus();
  }

  $("#auth").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const k = $("#api-key").value.trim();
    if (!k) return;
    apiKey = k;
    store.set(KEY_STORE, k);
    $("#api-key").value = "";
    $("#auth").hidden = true;
    loadModel().catch(noop);
    loadCluster().catch(noop);
    if (cluster.running) { stopCluster(); syncCluster(); }
  });

  class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function errorMessage(r) {
    let text = "";
    try { text = await r.text(); } catch (e) { /* no body */ }
    try {
      const o = JSON.parse(text);
      if (o && o.error) return typeof o.error === "string" ? o.error : o.error.message || JSON.stringify(o.error);
    } catch (e) { /* not JSON */ }
    const head = `HTTP ${r.status}${r.statusText ? " " + r.statusText : ""}`;
    return text && text.length < 300 ? `${head}: ${text}` : head;
  }

  async function getJSON(path) {
    const r = await fetch(path, { headers: headers(), cache: "no-store" });
    if (!r.ok) {
      if (r.status === 401) needKey();
      throw new HttpError(r.status, await errorMessage(r));
    }
    return r.json();
  }

  // Reads a Server-Sent Events body; onData gets each event's data and returns false to stop.
  async function readSSE(response, onData) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        let line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length) {
            const more = onData(data.join("\n"));
            data = [];
            if (more === false) { reader.cancel().catch(noop); return; }
          }
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        } // comments (":...") and other fields are ignored
      }
    }
    if (buf.startsWith("data:")) data.push(buf.slice(5).replace(/^ /, ""));
    if (data.length) onData(data.join("\n"));
  }

  // ---------- header: model and health ----------

  let modelId = null;

  function setModel(id) {
    if (!id) return;
    modelId = id;
    $("#model-name").textContent = id;
  }

  async function loadModel() {
    const o = await getJSON("/v1/models");
    if (o && Array.isArray(o.data) && o.data.length) setModel(o.data[0].id);
  }

  function setHealth(health) {
    if (!health) return;
    const status = health.status || "unknown";
    const badge = $("#health");
    badge.textContent = status;
    badge.dataset.status = status;
    badge.title = health.reason ? `${status}: ${health.reason}` : status;
    const banner = $("#health-reason");
    banner.hidden = status === "ok" || !health.reason;
    banner.textContent = health.reason ? `${status}: ${health.reason}` : "";
    banner.dataset.status = status;
  }

  // ---------- markdown (escaped first: the model's text never becomes markup) ----------

  function emphasis(s) {
    return s
      .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
      .replace(/\*(?=[^\s*])([^*]*?[^\s*])\*/g, "<em>$1</em>")
      .replace(/(^|[^\w])_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>")
      .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
  }

  function inline(raw) {
    const held = [];
    const hold = (html) => "\u0000" + (held.push(html) - 1) + "\u0000";
    let s = String(raw).replace(/`([^`]+)`/g, (_, code) => hold("<code>" + esc(code) + "</code>"));
    s = esc(s);
    s = s.replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, (_, text, url) =>
      hold(`<a href="${url}" target="_blank" rel="noopener noreferrer">${emphasis(text)}</a>`));
    s = emphasis(s);
    for (let n = 0; n < 4 && s.includes("\u0000"); n++) s = s.replace(/\u0000(\d+)\u0000/g, (_, i) => held[+i]);
    return s;
  }

  function markdown(src) {
    if (!src) return "";
    const lines = String(src).replace(/\u0000/g, "").replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let para = [];
    const lists = []; // open lists: {type, indent}
    let blank = false;
    const flushPara = () => {
      if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
      para = [];
    };
    const closeLists = (depth = 0) => {
      while (lists.length > depth) out.push(`</li></${lists.pop().type}>`);
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/);
      if (fence) {
        flushPara(); closeLists();
        const end = new RegExp(`^\\s*${fence[1][0]}{${fence[1].length},}\\s*$`);
        const code = [];
        for (i++; i < lines.length && !end.test(lines[i]); i++) code.push(lines[i]);
        const lang = fence[2] ? ` class="language-${esc(fence[2])}"` : "";
        out.push(`<pre><code${lang}>${esc(code.join("\n"))}</code></pre>`);
        blank = false;
        continue;
      }
      if (!line.trim()) { flushPara(); blank = true; continue; }
      const heading = line.match(/^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/);
      if (heading) {
        flushPara(); closeLists();
        const n = heading[1].length;
        out.push(`<h${n}>${inline(heading[2])}</h${n}>`);
        blank = false;
        continue;
      }
      if (/^\s{0,3}([-*_])(\s*\1){2,}\s*$/.test(line)) {
        flushPara(); closeLists(); out.push("<hr>"); blank = false;
        continue;
      }
      const quote = line.match(/^\s{0,3}>\s?(.*)$/);
      if (quote && !lists.length) {
        flushPara();
        const inner = [quote[1]];
        while (i + 1 < lines.length && /^\s{0,3}>/.test(lines[i + 1])) inner.push(lines[++i].replace(/^\s{0,3}>\s?/, ""));
        out.push("<blockquote>" + markdown(inner.join("\n")) + "</blockquote>");
        blank = false;
        continue;
      }
      const item = line.match(/^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/);
      if (item) {
        flushPara();
        const indent = item[1].replace(/\t/g, "    ").length;
        const type = /\d/.test(item[2]) ? "ol" : "ul";
        while (lists.length && indent < lists[lists.length - 1].indent) closeLists(lists.length - 1);
        const top = lists[lists.length - 1];
        if (top && top.indent === indent && top.type !== type) closeLists(lists.length - 1);
        const cur = lists[lists.length - 1];
        if (!cur || indent > cur.indent) {
          const start = type === "ol" && parseInt(item[2], 10) !== 1 ? ` start="${parseInt(item[2], 10)}"` : "";
          out.push(`<${type}${start}><li>`);
          lists.push({ type, indent });
        } else {
          out.push("</li><li>");
        }
        out.push(inline(item[3]));
        blank = false;
        continue;
      }
      if (lists.length && (!blank || /^\s{2,}/.test(line))) {
        out.push("<br>" + inline(line.trim())); // a continuation of the list item
        blank = false;
        continue;
      }
      closeLists();
      para.push(line);
      blank = false;
    }
    flushPara(); closeLists();
    return out.join("");
  }

  // ---------- chat ----------

  const messagesEl = $("#messages");
  const input = $("#chat-input");
  let chat = loadChat();
  let gen = null; // the answer being generated: {controller, turn, view}

  function loadChat() {
    try {
      const saved = JSON.parse(store.get(CHAT_STORE) || "[]");
      if (!Array.isArray(saved)) return [];
      return saved.filter((t) => t && (t.role === "user" || t.role === "assistant") && typeof t.content === "string")
        .map((t) => {
          // an answer cut off by leaving the page mid-stream
          if (t.role === "assistant" && !t.content && !t.error && !t.stopped && !t.stats) t.stopped = true;
          return t;
        });
    } catch (e) {
      return [];
    }
  }

  function saveChat() {
    if (chat.length) store.set(CHAT_STORE, JSON.stringify(chat));
    else store.del(CHAT_STORE);
  }

  // What is sent back: content only (earlier turns' reasoning is not), without failed exchanges.
  function outgoing(turns) {
    const out = [];
    for (const t of turns) {
      if (t.role === "assistant" && !t.content) {
        if (out.length && out[out.length - 1].role === "user") out.pop();
        continue;
      }
      out.push({ role: t.role, content: t.content });
    }
    return out;
  }

  function nearBottom() {
    return messagesEl.scrollHeight - messagesEl.scrollTop - messagesEl.clientHeight < 80;
  }

  function toBottom() { messagesEl.scrollTop = messagesEl.scrollHeight; }

  function fmtStats(s) {
    const parts = [`${s.tokens} token${s.tokens === 1 ? "" : "s"}`];
    if (s.tps != null) parts.push(`${s.tps.toFixed(1)} tok/s`);
    if (s.ttft != null) parts.push(`${s.ttft.toFixed(2)} s to first token`);
    return parts.join(" · ");
  }

  function renderTurn(turn) {
    if (turn.role === "user") {
      messagesEl.append(h("div", { class: "msg user", text: turn.content }));
      return null;
    }
    const el = h("div", { class: "msg assistant" });
    const answer = h("div", { class: "answer" });
    const stats = h("div", { class: "stats" });
    el.append(answer, stats);
    messagesEl.append(el);
    let thinking = null;
    let summary = null;
    let body = null;
    let pending = false;
    const view = {
      update() {
        pending = false;
        const stick = nearBottom();
        if (turn.reasoning && !thinking) {
          summary = h("summary");
          body = h("div", { class: "thinking-body" });
          thinking = h("details", { class: "thinking" }, summary, body);
          el.insertBefore(thinking, answer);
        }
        if (thinking) {
          summary.textContent = `Thought for ${turn.thinkTokens || 0} token${(turn.thinkTokens || 0) === 1 ? "" : "s"}`;
          body.textContent = turn.reasoning;
        }
        let html = markdown(turn.content);
        if (turn.error) html += `<p class="error">${esc(turn.error)}</p>`;
        if (turn.stopped) html += '<p class="stopped">(stopped)</p>';
        answer.innerHTML = html;
        stats.textContent = turn.stats ? fmtStats(turn.stats) : "";
        el.classList.toggle("waiting", !!(gen && gen.turn === turn) && !turn.content && !turn.reasoning);
        if (stick) toBottom();
      },
      schedule() {
        if (pending) return;
        pending = true;
        requestAnimationFrame(() => { if (pending) view.update(); });
      },
    };
    view.update();
    return view;
  }

  function renderChat() {
    messagesEl.textContent = "";
    for (const t of chat) renderTurn(t);
    toBottom();
  }

  function setGenerating(on) {
    $("#send").disabled = on;
    $("#stop").disabled = !on;
    document.body.classList.toggle("generating", on);
  }

  async function send() {
    if (gen) return;
    const text = input.value;
    if (!text.trim()) return;
    input.value = "";
    autosize();
    const user = { role: "user", content: text };
    const turn = { role: "assistant", content: "", reasoning: "", thinkTokens: 0 };
    chat.push(user, turn);
    const controller = new AbortController();
    gen = { controller, turn, view: null };
    setGenerating(true);
    renderTurn(user);
    const view = renderTurn(turn);
    gen.view = view;
    toBottom();
    saveChat();

    let usage = null;
    let chunks = 0;
    let tFirst = null;
    let t0 = performance.now();
    try {
      if (!modelId) await loadModel().catch(noop);
      const body = { messages: outgoing(chat.slice(0, -1)), stream: true, stream_options: { include_usage: true } };
      const request = modelId ? Object.assign({ model: modelId }, body) : body;
      t0 = performance.now();
      const r = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(request),
        signal: controller.signal,
      });
      if (!r.ok) {
        if (r.status === 401) needKey();
        turn.error = await errorMessage(r);
      } else {
        await readSSE(r, (data) => {
          if (data.trim() === "[DONE]") return false;
          let o;
          try { o = JSON.parse(data); } catch (e) { return true; }
          if (o.error) {
            turn.error = typeof o.error === "string" ? o.error : o.error.message || JSON.stringify(o.error);
            view.schedule();
            return true;
          }
          if (o.usage) usage = o.usage;
          const choice = Array.isArray(o.choices) ? o.choices[0] : null;
          const d = choice && choice.delta;
          if (!d) return true;
          if (d.reasoning_content) { turn.reasoning += d.reasoning_content; turn.thinkTokens += 1; }
          if (d.content) turn.content += d.content;
          if (d.reasoning_content || d.content) {
            chunks += 1;
            if (tFirst === null) tFirst = performance.now();
            view.schedule();
          }
          return true;
        });
      }
    } catch (e) {
      if (!controller.signal.aborted) turn.error = `Network error: ${e && e.message ? e.message : e}`;
    }
    if (controller.signal.aborted) turn.stopped = true;
    const tEnd = performance.now();
    if (tFirst !== null) {
      const tokens = usage && usage.completion_tokens != null ? usage.completion_tokens : chunks;
      const decode = (tEnd - tFirst) / 1000;
      const tps = tokens > 1 && decode > 0 ? (tokens - 1) / decode : tokens / Math.max((tEnd - t0) / 1000, 1e-3);
      turn.stats = { tokens, tps, ttft: (tFirst - t0) / 1000 };
    }
    const abandoned = gen && gen.abandoned;
    gen = null;
    setGenerating(false);
    view.update();
    if (!abandoned) saveChat();
    if (!abandoned && $("#auth").hidden) loadCluster().catch(noop); // fresh health in the header
  }

  function stop() {
    if (gen) gen.controller.abort();
  }

  function newChat() {
    if (gen) { gen.abandoned = true; gen.controller.abort(); }
    chat = [];
    saveChat();
    renderChat();
    input.focus();
  }

  function autosize() {
    input.style.height = "auto";
    input.style.height = Math.min(input.scrollHeight + 2, 220) + "px";
  }

  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) {
      ev.preventDefault();
      send().catch(noop);
    }
  });
  input.addEventListener("input", autosize);
  $("#send").addEventListener("click", () => send().catch(noop));
  $("#stop").addEventListener("click", stop);
  $("#new-chat").addEventListener("click", newChat);
  window.addEventListener("pagehide", () => {
    if (gen && !gen.abandoned) { gen.turn.stopped = true; saveChat(); }
  });

  // ---------- cluster ----------

  const cluster = { running: false, timer: null, stream: null, retry: null, backoff: 1000, eventsKey: "" };
  let tab = "chat";

  async function loadCluster() {
    const d = await getJSON("/v1/cluster");
    renderCluster(d);
    return d;
  }

  function renderCluster(d) {
    if (!d || typeof d !== "object") return;
    setModel(d.model);
    setHealth(d.health);
    const nodes = Array.isArray(d.nodes) ? d.nodes : [];
    const stages = Array.isArray(d.stages) ? d.stages : [];
    const colour = nodeColours(nodes, stages);
    const bits = [];
    if (d.mode) bits.push(`${d.mode} mode`);
    if (d.num_layers != null) bits.push(`${d.num_layers} layers`);
    bits.push(`${nodes.length} node${nodes.length === 1 ? "" : "s"}`);
    bits.push(`${stages.length} stage${stages.length === 1 ? "" : "s"}`);
    $("#cluster-summary").textContent = bits.join(" · ");
    renderPlan(stages, colour);
    renderNodes(nodes, colour);
    if (d.live) renderLive(d.live);
    if (d.events) renderEvents(d.events);
  }

  function nodeColours(nodes, stages) {
    const map = new Map();
    for (const n of nodes) if (!map.has(n.name)) map.set(n.name, PALETTE[map.size % PALETTE.length]);
    for (const s of stages) if (!map.has(s.node)) map.set(s.node, PALETTE[map.size % PALETTE.length]);
    return map;
  }

  function renderPlan(stages, colour) {
    const plan = $("#plan");
    plan.textContent = "";
    for (const s of stages) {
      const [start, end] = Array.isArray(s.layers) ? s.layers : [0, 0];
      let text = `rank ${s.rank}: layers ${start}-${end - 1}`;
      let experts = "";
      if (s.experts) {
        const owned = Array.isArray(s.experts.owned) ? s.experts.owned.length : s.experts.owned;
        experts = `, ${owned} of ${s.experts.total} experts`;
        text += experts;
      }
      const tip = [text, `node ${s.node}`];
      if (s.weight_bytes != null) tip.push(`weights ${fmtBytes(s.weight_bytes)}`);
      plan.append(h("div", {
        class: "stage",
        "data-rank": s.rank,
        "data-node": s.node,
        title: tip.join("\n"),
        style: { flexGrow: String(Math.max(end - start, 1)), background: colour.get(s.node) },
      }, h("span", { class: "stage-text" }, // one inline box, so the text reads as one line
        `rank ${s.rank}: layers `, h("span", { class: "nowrap", text: `${start}-${end - 1}` }), experts)));
    }
    if (!stages.length) plan.append(h("div", { class: "empty muted", text: "no stages" }));
    const legend = $("#plan-legend");
    legend.textContent = "";
    const seen = new Set();
    for (const s of stages) {
      if (seen.has(s.node)) continue;
      seen.add(s.node);
      legend.append(h("span", { class: "key" }, h("i", { style: { background: colour.get(s.node) } }), s.node));
    }
  }

  function renderNodes(nodes, colour) {
    const box = $("#nodes");
    box.textContent = "";
    for (const n of nodes) {
      const m = n.memory || {};
      const known = [m.weights, m.kv_cache, m.free].filter((x) => x != null).reduce((a, b) => a + b, 0);
      const base = m.total != null && m.total > 0 ? Math.max(m.total, known) : known;
      const pct = (x) => (x != null && base > 0 ? (100 * x) / base : 0);
      const seg = (cls, x, label) => h("div", {
        class: cls,
        title: `${label}: ${fmtBytes(x)}`,
        style: { width: pct(x).toFixed(3) + "%", minWidth: x > 0 ? "2px" : "0" },
      });
      const health = n.health || "unknown";
      const sub = [n.chip || "unknown chip"];
      if (n.host) sub.push(n.host);
      if (Array.isArray(n.ranks) && n.ranks.length) sub.push(`rank${n.ranks.length === 1 ? "" : "s"} ${n.ranks.join(", ")}`);
      const links = Array.isArray(n.links) ? n.links : [];
      box.append(h("div", {
        class: "node-card" + (health === "lost" ? " lost" : ""),
        "data-node": n.name,
        "data-health": health,
        style: { borderLeftColor: colour.get(n.name) },
      },
      h("div", { class: "node-head" },
        h("span", { class: "node-name", text: n.name }),
        h("span", { class: "badge node-health", "data-status": health, text: health })),
      h("div", { class: "node-chip muted small", text: sub.join(" · ") }),
      h("div", { class: "mem-bar", title: `total ${fmtBytes(m.total)}` },
        seg("mem-weights", m.weights, "weights"),
        seg("mem-kv", m.kv_cache, "KV cache"),
        seg("mem-free", m.free, "free")),
      h("div", { class: "mem-legend small" },
        h("span", { class: "key" }, h("i", { class: "k-weights" }), `weights ${fmtBytes(m.weights)}`),
        h("span", { class: "key" }, h("i", { class: "k-kv" }), `KV ${fmtBytes(m.kv_cache)}`),
        h("span", { class: "key" }, h("i", { class: "k-free" }), `free ${fmtBytes(m.free)}`),
        h("span", { class: "key muted" }, `of ${fmtBytes(m.total)}`)),
      links.length
        ? h("ul", { class: "links small" }, links.map((l) => h("li", { class: "link", "data-kind": l.kind || "unknown" },
          `→ ${l.to} `, h("span", { class: "link-kind", text: l.kind || "unknown" }))))
        : h("div", { class: "links small muted", text: "no links" })));
    }
    if (!nodes.length) box.append(h("div", { class: "empty muted", text: "no nodes" }));
  }

  function renderLive(live) {
    $("#live-tps").textContent = num(live.tokens_per_second, 1);
    const q = (x) => (x == null ? "–" : String(x));
    $("#live-queue").textContent = `${q(live.queued)} / ${q(live.active)} / ${q(live.slots)}`;
    $("#live-ttft").textContent = num(live.ttft_mean_s, 2);
    $("#live-hits").textContent = live.prefix_cache_hit_tokens == null ? "–" : String(live.prefix_cache_hit_tokens);
    const bits = [];
    if (live.requests_total != null) bits.push(`${live.requests_total} request${live.requests_total === 1 ? "" : "s"}`);
    if (live.cancelled != null) bits.push(`${live.cancelled} cancelled`);
    $("#live-requests").textContent = bits.join(" · ");
  }

  function renderEvents(events) {
    if (!Array.isArray(events)) return;
    const last = events[events.length - 1];
    const key = events.length + "|" + (last ? `${last.t}|${last.event}|${last.message}` : "");
    if (key === cluster.eventsKey) return;
    cluster.eventsKey = key;
    const list = $("#events");
    list.textContent = "";
    for (const e of events.slice().reverse()) {
      const when = new Date((e.t || 0) * 1000);
      list.append(h("li", { class: "event", "data-event": e.event },
        h("time", { datetime: when.toISOString(), title: when.toLocaleString(), text: when.toLocaleTimeString() }),
        h("span", { class: "event-kind", text: e.event }),
        h("span", { class: "event-message", text: e.message || "" })));
    }
    if (!events.length) list.append(h("li", { class: "empty muted", text: "no events" }));
  }

  function setStreamState(text) { $("#stream-state").textContent = text; }

  async function openStream() {
    if (!cluster.running || cluster.stream) return;
    const ctl = new AbortController();
    cluster.stream = ctl;
    try {
      const r = await fetch("/v1/cluster/stream", {
        headers: headers({ Accept: "text/event-stream" }), signal: ctl.signal, cache: "no-store",
      });
      if (r.status === 401) {
        needKey(); // wait for a key: saving one restarts the stream
        if (cluster.stream === ctl) cluster.stream = null;
        setStreamState("needs an API key");
        return;
      }
      if (!r.ok || !r.body) throw new HttpError(r.status, `HTTP ${r.status}`);
      setStreamState("live");
      await readSSE(r, (data) => {
        let o;
        try { o = JSON.parse(data); } catch (e) { return true; }
        cluster.backoff = 1000;
        if (o.live) renderLive(o.live);
        if (o.health) setHealth(o.health);
        if (o.events) renderEvents(o.events);
        return true;
      });
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    if (cluster.stream !== ctl) return;
    cluster.stream = null;
    if (!cluster.running) return;
    const wait = cluster.backoff;
    cluster.backoff = Math.min(cluster.backoff * 2, 30000);
    setStreamState(`reconnecting in ${Math.round(wait / 1000)} s`);
    cluster.retry = setTimeout(() => { cluster.retry = null; openStream().catch(noop); }, wait);
  }

  function startCluster() {
    cluster.running = true;
    cluster.backoff = 1000;
    loadCluster().catch(noop);
    cluster.timer = setInterval(() => loadCluster().catch(noop), 10000);
    openStream().catch(noop);
  }

  function stopCluster() {
    cluster.running = false;
    clearInterval(cluster.timer);
    clearTimeout(cluster.retry);
    cluster.timer = cluster.retry = null;
    if (cluster.stream) { const ctl = cluster.stream; cluster.stream = null; ctl.abort(); }
    setStreamState("paused");
  }

  // Stream only while the Cluster tab is shown and the page is visible.
  function syncCluster() {
    const want = tab === "cluster" && document.visibilityState === "visible";
    if (want && !cluster.running) startCluster();
    else if (!want && cluster.running) stopCluster();
  }

  function showTab(name) {
    tab = name;
    for (const t of ["chat", "cluster"]) {
      const on = t === name;
      const button = $(`#tab-${t}`);
      button.classList.toggle("active", on);
      button.setAttribute("aria-selected", String(on));
      $(`#view-${t}`).hidden = !on;
    }
    try {
      history.replaceState(null, "", location.pathname + location.search + (name === "cluster" ? "#cluster" : ""));
    } catch (e) { /* no history: fine */ }
    syncCluster();
  }

  $("#tab-chat").addEventListener("click", () => { showTab("chat"); input.focus(); });
  $("#tab-cluster").addEventListener("click", () => showTab("cluster"));
  document.addEventListener("visibilitychange", syncCluster);

  // ---------- start ----------

  renderChat();
  loadModel().catch(noop);
  if (location.hash === "#cluster") showTab("cluster");
  else { showTab("chat"); loadCluster().catch(noop); }
})();
