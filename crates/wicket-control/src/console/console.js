// The Wicket console: approvals (live) and sessions, over the console's JSON API.
// Every value from the server goes in with textContent, never as HTML.
"use strict";

const view = () => document.getElementById("view");
const status = (text) => { document.getElementById("status").textContent = text; };
let me = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

async function api(path, options) {
  const r = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.detail || ("HTTP " + r.status));
  return body;
}

function when(t) { return t ? new Date(t).toLocaleString() : ""; }

function principal(p) {
  if (!p) return "";
  const name = p.display_name || p.subject;
  return name + (p.kind === "agent" ? " (agent)" : "");
}

function duration(s) {
  if (s % 3600 === 0) return (s / 3600) + " h";
  if (s % 60 === 0) return (s / 60) + " min";
  return s + " s";
}

function reasoning(r) {
  if (!r || (!r.reasoning && !(r.steps || []).length)) {
    return el("p", { class: "meta" }, "No reasoning given.");
  }
  const box = el("div", { class: "reasoning" }, el("strong", {}, "Reasoning: "), r.reasoning || "");
  if (r.steps && r.steps.length) {
    const ol = el("ol");
    for (const s of r.steps) {
      ol.append(el("li", {}, s.description || "", s.tool ? " [" + s.tool + "]" : "", s.observation ? " → " + s.observation : ""));
    }
    box.append(ol);
  }
  if (r.confidence) box.append(el("div", { class: "meta" }, "Confidence: " + r.confidence));
  if (r.sources && r.sources.length) box.append(el("div", { class: "meta" }, "Sources: " + r.sources.join(", ")));
  if (r.trace_id) box.append(el("div", { class: "meta" }, "Trace: " + r.trace_id));
  return box;
}

function approvalCard(a) {
  const r = a.request || {};
  const cmd = r.command || {};
  const cls = cmd.classification || {};
  const d = r.decision || {};
  const review = d.review || {};
  const card = el("article", { class: "card", "data-approval": a.id });
  card.append(
    el("h3", {}, principal(r.principal), " on ", r.connection, " — ", cls.kind || "command"),
    el("div", { class: "meta" },
      "Rule ", el("strong", {}, d.rule || ""), " · risk ",
      el("span", { class: (cls.risk || 0) >= 60 ? "risk-high" : "" }, String(cls.risk || 0)),
      " · asked ", when(a.created_at), " · expires ", when(a.expires_at),
      " · state ", el("span", { class: "state", "data-state": a.state }, a.state)),
    el("pre", { class: "command" }, cmd.text || ""),
    reasoning(r.reasoning),
  );
  if (a.votes && a.votes.length) {
    const ul = el("ul", { class: "meta" });
    for (const v of a.votes) ul.append(el("li", {}, (v.approve ? "approved by " : "denied by ") + v.approver + (v.comment ? ": " + v.comment : "")));
    card.append(ul);
  }
  if (a.state === "pending" && me && me.can_decide) {
    const comment = el("input", { type: "text", placeholder: "Comment or reason", name: "comment" });
    const actions = el("div", { class: "actions" }, comment);
    let reuse = null;
    if (review.reuse_seconds) {
      reuse = el("select", { name: "reuse" }, el("option", { value: "0" }, "this execution only"));
      for (const s of [300, 1800, 3600, 14400, 86400]) {
        if (s <= review.reuse_seconds) reuse.append(el("option", { value: String(s) }, "and the same statement for " + duration(s)));
      }
      actions.append(reuse);
    }
    const decide = (verb) => async () => {
      try {
        await api("/api/approvals/" + encodeURIComponent(a.id) + "/" + verb, {
          method: "POST",
          headers: { "content-type": "application/json", "x-wicket-csrf": "1" },
          body: JSON.stringify({ comment: comment.value, reuse_seconds: reuse ? Number(reuse.value) : 0 }),
        });
        status((verb === "approve" ? "Approved " : "Denied ") + a.id);
        await route();
      } catch (e) { status(e.message); }
    };
    actions.append(
      el("button", { class: "approve", onclick: decide("approve") }, "Approve"),
      el("button", { class: "deny", onclick: decide("deny") }, "Deny"),
    );
    card.append(actions);
  }
  return card;
}

async function showApprovals() {
  const all = new URLSearchParams(location.search).get("state") === "all";
  const list = await api("/api/approvals" + (all ? "?state=all" : ""));
  const v = view();
  v.replaceChildren(
    el("h2", {}, all ? "All approvals" : "Waiting for approval"),
    el("p", { class: "meta" }, el("a", { href: all ? "/approvals" : "/approvals?state=all", "data-nav": "" }, all ? "Only pending" : "Show decided ones too")),
  );
  if (!list.length) v.append(el("p", { id: "empty" }, "Nothing is waiting."));
  for (const a of list) v.append(approvalCard(a));
}

async function showApproval(id) {
  const a = await api("/api/approvals/" + encodeURIComponent(id));
  view().replaceChildren(el("h2", {}, "Approval " + a.id), approvalCard(a));
}

async function showSessions() {
  const list = await api("/api/sessions");
  const t = el("table", {}, el("tr", {}, ...["Started", "Principal", "Connection", "State", "Commands", "Client"].map((h) => el("th", {}, h))));
  for (const s of list) {
    t.append(el("tr", { "data-session": s.id },
      el("td", {}, el("a", { href: "/sessions/" + encodeURIComponent(s.id), "data-nav": "" }, when(s.started_at))),
      el("td", {}, s.principal + (s.kind === "agent" ? " (agent)" : "")), el("td", {}, s.connection),
      el("td", {}, s.state + (s.end_reason ? " (" + s.end_reason + ")" : "")), el("td", {}, String(s.commands)),
      el("td", {}, [s.client_app, s.client_addr].filter(Boolean).join(" "))));
  }
  view().replaceChildren(el("h2", {}, "Sessions"), t);
}

// A small terminal: printable text, CR, LF, backspace, tab, and the CSI
// sequences shells and most programs use to move the cursor and erase;
// colours and other modes are read and ignored.
class Screen {
  constructor(cols, rows) {
    this.cols = cols; this.rows = rows; this.x = 0; this.y = 0;
    this.lines = Array.from({ length: rows }, () => " ".repeat(cols));
    this.pending = "";
  }
  put(ch) {
    if (this.x >= this.cols) { this.x = 0; this.newline(); }
    const l = this.lines[this.y];
    this.lines[this.y] = l.slice(0, this.x) + ch + l.slice(this.x + 1);
    this.x += 1;
  }
  newline() {
    if (this.y === this.rows - 1) { this.lines.shift(); this.lines.push(" ".repeat(this.cols)); } else this.y += 1;
  }
  erase(y, from, to) { const l = this.lines[y]; this.lines[y] = l.slice(0, from) + " ".repeat(Math.max(0, to - from)) + l.slice(to); }
  csi(params, final) {
    const n = params.map((p) => parseInt(p, 10)).map((v) => (isNaN(v) ? 0 : v));
    const a = n[0] || 1, clamp = () => { this.x = Math.max(0, Math.min(this.cols - 1, this.x)); this.y = Math.max(0, Math.min(this.rows - 1, this.y)); };
    switch (final) {
      case "A": this.y -= a; break;
      case "B": this.y += a; break;
      case "C": this.x += a; break;
      case "D": this.x -= a; break;
      case "G": this.x = a - 1; break;
      case "d": this.y = a - 1; break;
      case "H": case "f": this.y = (n[0] || 1) - 1; this.x = (n[1] || 1) - 1; break;
      case "J":
        if (n[0] === 2 || n[0] === 3) { for (let y = 0; y < this.rows; y++) this.erase(y, 0, this.cols); }
        else if (n[0] === 1) { for (let y = 0; y < this.y; y++) this.erase(y, 0, this.cols); this.erase(this.y, 0, this.x + 1); }
        else { this.erase(this.y, this.x, this.cols); for (let y = this.y + 1; y < this.rows; y++) this.erase(y, 0, this.cols); }
        break;
      case "K":
        if (n[0] === 1) this.erase(this.y, 0, this.x + 1); else if (n[0] === 2) this.erase(this.y, 0, this.cols); else this.erase(this.y, this.x, this.cols);
        break;
      default: break;
    }
    clamp();
  }
  write(data) {
    let s = this.pending + data; this.pending = "";
    for (let i = 0; i < s.length; i++) {
      const c = s[i];
      if (c === "\x1b") {
        const rest = s.slice(i);
        const m = /^\x1b\[([?0-9;]*)([@-~])/.exec(rest);
        if (m) { this.csi(m[1].replace("?", "").split(";"), m[2]); i += m[0].length - 1; continue; }
        const osc = /^\x1b\][^\x07\x1b]*(\x07|\x1b\\)/.exec(rest);
        if (osc) { i += osc[0].length - 1; continue; }
        if (rest.length < 3 || /^\x1b\[[?0-9;]*$/.test(rest) || /^\x1b\][^\x07]*$/.test(rest)) { this.pending = rest; return; }
        i += 1; continue; // a two-byte escape: skipped
      }
      if (c === "\r") this.x = 0;
      else if (c === "\n") this.newline();
      else if (c === "\b") this.x = Math.max(0, this.x - 1);
      else if (c === "\t") this.x = Math.min(this.cols - 1, (Math.floor(this.x / 8) + 1) * 8);
      else if (c >= " ") this.put(c);
    }
  }
  text() { return this.lines.map((l) => l.replace(/\s+$/, "")).join("\n").replace(/\n+$/, ""); }
}

// Terminal recordings (asciicast v2) of a session, by channel.
function recordings(events) {
  const casts = new Map();
  for (const e of events) {
    const d = e.details || {};
    if (e.kind !== "output" || d.channel === undefined) continue;
    const c = casts.get(d.channel) || { header: null, lines: "" };
    if (d.asciicast_header) c.header = JSON.parse(d.asciicast_header);
    if (d.asciicast) c.lines += d.asciicast;
    casts.set(d.channel, c);
  }
  return [...casts.entries()].filter(([, c]) => c.header);
}

// Plays a recording into a <pre>: play/pause, speed, and idle gaps cut to a second.
function player(channel, cast) {
  const frames = cast.lines.split("\n").filter(Boolean).map((l) => JSON.parse(l)).filter((f) => f[1] === "o");
  const screen = el("pre", { class: "terminal", "data-channel": channel });
  const speed = el("select", {}, ...[1, 2, 4, 8].map((x) => el("option", { value: String(x) }, x + "×")));
  const where = el("span", { class: "meta" });
  let timer = null, next = 0, term = null, clock = 0;
  const reset = () => { term = new Screen(cast.header.width || 80, cast.header.height || 24); next = 0; clock = 0; screen.textContent = ""; };
  const step = () => {
    if (next >= frames.length) { timer = null; button.textContent = "Replay"; where.textContent = "ended"; return; }
    const f = frames[next++];
    term.write(f[2]);
    screen.textContent = term.text();
    where.textContent = f[0].toFixed(1) + " s";
    const gap = next < frames.length ? Math.min(frames[next][0] - f[0], 1) : 0;
    clock = f[0];
    timer = setTimeout(step, Math.max(0, gap * 1000 / Number(speed.value)));
  };
  const button = el("button", { class: "play", onclick: () => {
    if (timer) { clearTimeout(timer); timer = null; button.textContent = "Play"; return; }
    if (next >= frames.length) reset();
    button.textContent = "Pause"; step();
  } }, "Play");
  reset();
  return el("div", { class: "card recording" }, el("h3", {}, "Terminal recording (channel " + channel + ")"),
    el("div", { class: "actions" }, button, speed, where), screen);
}

async function showSession(id) {
  const s = await api("/api/sessions/" + encodeURIComponent(id));
  const players = recordings(s.events).map(([ch, c]) => player(ch, c));
  const t = el("table", {}, el("tr", {}, ...["Time", "Event", "Command", "Decision", "Reasoning"].map((h) => el("th", {}, h))));
  for (const e of s.events.filter((e) => e.kind !== "output")) {
    const d = e.decision || {};
    t.append(el("tr", {},
      el("td", {}, when(e.time)), el("td", {}, e.kind),
      el("td", {}, el("pre", {}, (e.command && e.command.text) || "")),
      el("td", {}, d.effect ? d.effect + (d.rule ? " (" + d.rule + ")" : "") : ""),
      el("td", {}, (e.reasoning && e.reasoning.reasoning) || "")));
  }
  view().replaceChildren(
    el("h2", {}, "Session " + s.id),
    el("p", { class: "meta" }, s.principal + " on " + s.connection + " · " + when(s.started_at) + " · " + s.state),
    ...players,
    t);
}

async function route() {
  const parts = location.pathname.split("/").filter(Boolean);
  try {
    if (parts[0] === "sessions" && parts[1]) await showSession(decodeURIComponent(parts[1]));
    else if (parts[0] === "sessions") await showSessions();
    else if (parts[0] === "approvals" && parts[1]) await showApproval(decodeURIComponent(parts[1]));
    else await showApprovals();
  } catch (e) { status(e.message); }
}

document.addEventListener("click", (ev) => {
  const a = ev.target.closest("a[data-nav]");
  if (!a) return;
  ev.preventDefault();
  history.pushState({}, "", a.getAttribute("href"));
  route();
});
window.addEventListener("popstate", route);

async function start() {
  try {
    me = await api("/api/me");
    document.getElementById("me").textContent = me.name + (me.can_decide ? " · approver" : " · reader");
  } catch (e) { status(e.message); return; }
  // Live: any approval change re-renders the approval views. The stream is
  // subscribed before the list is read (and the list read again whenever it
  // (re)connects), so no change falls between the two.
  const refresh = () => { if (!location.pathname.startsWith("/sessions")) route(); };
  const events = new EventSource("/api/events");
  events.addEventListener("open", () => { document.body.dataset.live = "1"; refresh(); });
  events.addEventListener("error", () => { delete document.body.dataset.live; });
  events.addEventListener("approval", refresh);
  events.addEventListener("resync", refresh);
  await route();
}

start();
