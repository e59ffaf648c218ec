// The StacyVM dashboard: sandboxes whose state changes live (GraphQL
// subscription `sandboxEvents`), a command's whole output as a terminal
// (`execStream`), a sandbox's files (REST), workers and audit events. The
// API key is entered once and kept in this browser (localStorage); every
// request goes to this page's own origin.
(function () {
  'use strict';
  var KEY_STORE = 'stacyvm.apiKey';
  var apiKey = localStorage.getItem(KEY_STORE) || '';
  var selected = null;
  var rows = new Map();
  var client = null;
  var stops = [];

  function $(id) { return document.getElementById(id); }
  function headers() { return apiKey ? { 'X-API-Key': apiKey } : {}; }
  function text(tag, value, cls) {
    var el = document.createElement(tag);
    el.textContent = value;
    if (cls) el.className = cls;
    return el;
  }

  function gql(query, variables) {
    return fetch('/graphql', {
      method: 'POST',
      headers: Object.assign({ 'Content-Type': 'application/json' }, headers()),
      body: JSON.stringify({ query: query, variables: variables || {} }),
    }).then(function (r) { return r.json(); }).then(function (body) {
      if (body.errors && body.errors.length) throw new Error(body.errors[0].message);
      return body.data;
    });
  }

  function status(message) { $('connection').textContent = message; }

  function renderRow(s) {
    var tr = rows.get(s.id);
    if (!tr) {
      tr = document.createElement('tr');
      tr.dataset.id = s.id;
      tr.addEventListener('click', function () { select(s.id); });
      rows.set(s.id, tr);
      $('sandboxes').tBodies[0].appendChild(tr);
    }
    tr.replaceChildren(
      text('td', s.id),
      text('td', s.state.toLowerCase(), 'state-' + s.state.toLowerCase()),
      text('td', s.provider || ''),
      text('td', s.image || ''),
      text('td', s.expiresAt ? new Date(s.expiresAt).toLocaleTimeString() : '')
    );
    tr.classList.toggle('selected', s.id === selected);
    $('sandbox-count').textContent = '(' + rows.size + ')';
  }

  function removeRow(id) {
    var tr = rows.get(id);
    if (tr) tr.remove();
    rows.delete(id);
    $('sandbox-count').textContent = '(' + rows.size + ')';
    if (id === selected) select(null);
  }

  function loadSandboxes() {
    return gql('{ sandboxes(first: 100) { nodes { id state provider image expiresAt } } workers { id status adminState providers } }')
      .then(function (data) {
        data.sandboxes.nodes.forEach(renderRow);
        $('workers').replaceChildren.apply($('workers'), data.workers.map(function (w) {
          return text('li', w.id + ' \u2014 ' + w.status + ', ' + w.adminState + ' (' + w.providers.join(', ') + ')');
        }));
      });
  }

  function subscribe(query, variables, onData) {
    var stop = client.subscribe({ query: query, variables: variables || {} }, {
      next: function (msg) {
        if (msg.errors) { status('error: ' + msg.errors[0].message); return; }
        onData(msg.data);
      },
      error: function (e) { status('subscription error: ' + (e && e.message ? e.message : 'closed')); },
      complete: function () {},
    });
    stops.push(stop);
    return stop;
  }

  function connect() {
    stops.forEach(function (stop) { stop(); });
    stops = [];
    if (client) client.dispose();
    rows.forEach(function (tr) { tr.remove(); });
    rows.clear();
    var url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/graphql/ws';
    client = graphqlWs.createClient({
      url: url,
      connectionParams: function () { return headers(); },
      retryAttempts: 5,
      on: {
        connected: function () { status('live'); },
        closed: function () { status('disconnected'); },
      },
    });
    subscribe('subscription { sandboxEvents { sandboxId state reason at } }', {}, function (data) {
      var e = data.sandboxEvents;
      if (e.state === 'DESTROYED') { removeRow(e.sandboxId); return; }
      // A new sandbox, or one whose other fields are not known yet.
      gql('query($id: ID!) { sandbox(id: $id) { id state provider image expiresAt } }', { id: e.sandboxId })
        .then(function (d) { renderRow(d.sandbox); })
        .catch(function () { removeRow(e.sandboxId); });
    });
    subscribe('subscription { auditEvents { action target outcome createdAt } }', {}, function (data) {
      var a = data.auditEvents;
      var list = $('audit');
      list.insertBefore(text('li', new Date(a.createdAt).toLocaleTimeString() + ' ' + a.action + ' ' + a.target + ' ' + a.outcome), list.firstChild);
      while (list.children.length > 50) list.lastChild.remove();
    });
    loadSandboxes().catch(function (e) { status('error: ' + e.message); });
  }

  function select(id) {
    selected = id;
    rows.forEach(function (tr, key) { tr.classList.toggle('selected', key === id); });
    $('selected').textContent = id || 'none selected';
    $('command').disabled = !id;
    $('run').disabled = !id;
    $('terminal').replaceChildren();
    $('files').replaceChildren();
    if (id) loadFiles();
  }

  function loadFiles() {
    var path = $('files-path').value || '/';
    var id = selected;
    fetch('/api/v1/sandboxes/' + encodeURIComponent(id) + '/files/list?path=' + encodeURIComponent(path), { headers: headers() })
      .then(function (r) { return r.json(); })
      .then(function (entries) {
        if (id !== selected) return;
        if (!Array.isArray(entries)) { $('files').replaceChildren(text('li', entries.message || 'cannot list')); return; }
        $('files').replaceChildren.apply($('files'), entries.map(function (e) {
          return text('li', (e.is_dir ? e.name + '/' : e.name) + '  ' + e.size + ' B  ' + e.mode);
        }));
      });
  }

  function run(command) {
    var term = $('terminal');
    term.appendChild(text('div', '$ ' + command, 'prompt'));
    subscribe(
      'subscription($id: ID!, $input: ExecCommandInput!) { execStream(sandboxId: $id, input: $input) { __typename ... on OutputChunk { stream data } ... on ExecExit { exitCode duration timedOut } } }',
      { id: selected, input: { command: command } },
      function (data) {
        var ev = data.execStream;
        if (ev.__typename === 'OutputChunk') {
          term.appendChild(text('span', ev.data, ev.stream === 'STDERR' ? 'stderr' : 'stdout'));
        } else if (ev.__typename === 'ExecExit') {
          term.appendChild(text('div', ev.timedOut ? '[timed out]' : '[exit ' + ev.exitCode + ' after ' + ev.duration + ']', 'exit'));
          loadFiles();
        }
        term.scrollTop = term.scrollHeight;
      }
    );
  }

  $('api-key').value = apiKey;
  $('key-form').addEventListener('submit', function (ev) {
    ev.preventDefault();
    apiKey = $('api-key').value.trim();
    if (apiKey) localStorage.setItem(KEY_STORE, apiKey); else localStorage.removeItem(KEY_STORE);
    connect();
  });
  $('exec-form').addEventListener('submit', function (ev) {
    ev.preventDefault();
    var command = $('command').value.trim();
    if (command && selected) run(command);
  });
  $('files-path').addEventListener('change', function () { if (selected) loadFiles(); });
  connect();
})();
