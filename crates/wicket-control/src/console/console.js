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

async function showSession(id) {
  const s = await api("/api/sessions/" + encodeURIComponent(id));
  const t = el("table", {}, el("tr", {}, ...["Time", "Event", "Command", "Decision", "Reasoning"].map((h) => el("th", {}, h))));
  for (const e of s.events) {
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
  await route();
  // Live: any approval change re-renders the approval views.
  const events = new EventSource("/api/events");
  const refresh = () => { if (!location.pathname.startsWith("/sessions")) route(); };
  events.addEventListener("approval", refresh);
  events.addEventListener("resync", refresh);
}

start();
