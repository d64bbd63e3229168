// The console's live parts, in plain JavaScript: the turns table (refreshed from /console/turns.json)
// and a turn's page (its session's events over the API's SSE route, with a stream token).
(function () {
  "use strict";
  var csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // --- turns table ------------------------------------------------------------
  function liveTurns(table) {
    var note = document.getElementById("live-note");
    var tbody = table.querySelector("tbody");
    function row(t) {
      var tr = el("tr", {"data-turn-id": t.id});
      var input = el("td", {"class": "input"}); input.appendChild(el("a", {href: t.url}, t.input)); tr.appendChild(input);
      tr.appendChild(el("td", {}, t.user));
      tr.appendChild(el("td", {}, t.agent));
      var st = el("td"); st.appendChild(el("span", {"class": "status s-" + t.status}, t.status)); tr.appendChild(st);
      tr.appendChild(el("td", {"class": "num"}, String(t.step)));
      tr.appendChild(el("td", {"class": "num"}, String(t.attempts)));
      tr.appendChild(el("td", {"class": "num age"}, Math.floor(t.age_seconds) + " s"));
      return tr;
    }
    function refresh() {
      if (document.hidden) return schedule();
      fetch(table.dataset.src + window.location.search, {headers: {Accept: "application/json"}, credentials: "same-origin"})
        .then(function (r) {
          if (r.status === 401) { window.location.reload(); throw new Error("signed out"); }
          return r.json();
        })
        .then(function (body) {
          var rows = body.data || [];
          tbody.replaceChildren.apply(tbody, rows.length ? rows.map(row)
            : [(function () { var tr = el("tr", {"class": "empty"}); tr.appendChild(el("td", {colspan: "7"}, "No turns yet.")); return tr; })()]);
          if (note) { note.textContent = "live"; note.classList.remove("stale"); }
        })
        .catch(function () { if (note) { note.textContent = "reconnecting…"; note.classList.add("stale"); } })
        .then(schedule);
    }
    function schedule() { window.setTimeout(refresh, 1000); }
    schedule();
  }

  // --- one turn ----------------------------------------------------------------
  var TYPES = ["turn.queued", "turn.started", "turn.resumed", "turn.requires_action", "turn.completed", "turn.failed",
    "turn.cancelled", "turn.expired", "turn.incomplete", "step.started", "step.completed", "step.retrying",
    "tool.call", "tool.result", "message.delta", "message.completed"];
  var FINAL = /^turn\.(completed|failed|cancelled|expired|incomplete)$/;

  function liveTurn(box) {
    var turnId = box.dataset.turnId;
    var list = document.getElementById("events");
    var state = document.getElementById("stream-state");
    var source = null, lastCursor = 0, deltaItem = null, refreshTimer = null, failures = 0;

    function refreshPanels() {
      window.clearTimeout(refreshTimer);
      refreshTimer = window.setTimeout(function () {
        fetch(box.dataset.panelsUrl, {credentials: "same-origin"}).then(function (r) { return r.ok ? r.text() : null; })
          .then(function (html) { if (html !== null) document.getElementById("panels").innerHTML = html; });
      }, 150);
    }
    function show(type, event) {
      var data = event.data || {};
      if (type === "message.delta") {
        if (!deltaItem) {
          deltaItem = el("li");
          deltaItem.appendChild(el("span", {"class": "type"}, "message"));
          deltaItem.appendChild(el("span", {"class": "data"}, ""));
          list.appendChild(deltaItem);
        }
        deltaItem.lastChild.textContent += data.delta || data.text || data.content || "";
        return;
      }
      deltaItem = null;
      var li = el("li");
      li.appendChild(el("span", {"class": "t"}, new Date((event.ts || 0) * 1000).toLocaleTimeString()));
      li.appendChild(el("span", {"class": "type"}, type));
      li.appendChild(el("span", {"class": "data"}, JSON.stringify(data).slice(0, 300)));
      list.appendChild(li);
      list.scrollTop = list.scrollHeight;
    }
    function onEvent(type) {
      return function (message) {
        lastCursor = Number(message.lastEventId) || lastCursor;
        var event;
        try { event = JSON.parse(message.data); } catch (e) { return; }
        if (event.turn_id && event.turn_id !== turnId) return;
        show(type, event);
        if (type !== "message.delta") refreshPanels();
        if (FINAL.test(type)) state.textContent = "finished";
      };
    }
    function connect() {
      fetch(box.dataset.tokenUrl, {method: "POST", credentials: "same-origin", headers: {"X-CSRF-Token": csrf}})
        .then(function (r) { if (!r.ok) throw new Error("token " + r.status); return r.json(); })
        .then(function (t) {
          source = new EventSource(t.url + "?token=" + encodeURIComponent(t.token) + "&after=" + lastCursor);
          source.onopen = function () { failures = 0; state.textContent = "live"; };
          TYPES.forEach(function (type) { source.addEventListener(type, onEvent(type)); });
          source.onerror = function () {
            // A stream token is checked when the stream opens: reconnect with a fresh one, from the last cursor.
            source.close();
            state.textContent = "reconnecting…";
            failures += 1;
            window.setTimeout(connect, Math.min(10000, 500 * failures));
          };
        })
        .catch(function () { state.textContent = "offline; retrying"; failures += 1; window.setTimeout(connect, Math.min(10000, 1000 * failures)); });
    }
    connect();
  }

  document.addEventListener("DOMContentLoaded", function () {
    var table = document.getElementById("turns");
    if (table) liveTurns(table);
    var box = document.getElementById("turn");
    if (box) liveTurn(box);
  });
})();
