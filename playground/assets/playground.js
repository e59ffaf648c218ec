// StacyVM GraphQL playground: starts GraphiQL (vendored UMD build, global
// `GraphiQL`) with
//   - queries and mutations sent as POST /graphql on this origin,
//   - subscriptions over the WebSocket endpoint /graphql/ws on this origin
//     (graphql-transport-ws protocol, the `graphql-ws` client: global
//     `graphqlWs`), ws: or wss: to match the page,
//   - example operations preloaded as tabs.
// No other host is ever contacted.
(function () {
  'use strict';

  var wsScheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
  var subscriptionUrl = wsScheme + '//' + window.location.host + '/graphql/ws';

  // The headers editor's content, as of the last operation: sent as the
  // connection_init payload, so a subscription acts as the same caller as a
  // query would with those headers.
  var lastHeaders = {};
  var wsClient = graphqlWs.createClient({
    url: subscriptionUrl,
    // Connect on the first subscription, close when none is left, so a
    // changed headers editor takes effect on the next connection.
    lazy: true,
    connectionParams: function () {
      return lastHeaders;
    },
    retryAttempts: 3,
  });

  var graphiqlFetcher = GraphiQL.createFetcher({
    url: '/graphql',
    wsClient: wsClient,
  });

  // GraphiQL 4 works out the operation name (and the parsed document it
  // passes as `documentAST`, which decides WebSocket or POST) from the query
  // editor's text 100 ms after the text last changed. Switching tabs replaces
  // the text, so an operation run within those 100 ms (a quick click on Run,
  // Ctrl-Enter) went out with the previous tab's operation name: "Unknown
  // operation named ...", or a query sent as a subscription. The query text
  // GraphiQL hands us is always the current one, so take both from it: keep
  // the chosen name if the document has it, else the document's first
  // operation, as GraphiQL itself settles on once its 100 ms are up.
  function currentOperation(params, opts) {
    var documentAST;
    try {
      documentAST = GraphiQL.GraphQL.parse(params.query);
    } catch (e) {
      return null; // not valid GraphQL: the server says why
    }
    var names = [];
    documentAST.definitions.forEach(function (def) {
      if (def.kind === 'OperationDefinition') {
        names.push(def.name ? def.name.value : null);
      }
    });
    var operationName = params.operationName;
    if (names.length > 0 && (operationName == null || names.indexOf(operationName) === -1)) {
      operationName = names[0];
    }
    return {
      params: Object.assign({}, params, { operationName: operationName == null ? null : operationName }),
      opts: Object.assign({}, opts, { documentAST: documentAST }),
    };
  }

  function fetcher(params, opts) {
    if (opts && opts.headers) {
      lastHeaders = opts.headers;
    }
    // Schema introspection is GraphiQL's own request, not the editor's.
    if (params.operationName !== 'IntrospectionQuery' && typeof params.query === 'string') {
      var current = currentOperation(params, opts);
      if (current) {
        params = current.params;
        opts = current.opts;
      }
    }
    return graphiqlFetcher(params, opts);
  }

  var spawn = [
    '# Spawn a sandbox, then copy its id into the',
    '# variables of the "Exec" tab.',
    'mutation Spawn {',
    '  spawnSandbox(input: {image: "alpine:latest", ttl: "30m"}) {',
    '    id',
    '    state',
    '    provider',
    '    image',
    '  }',
    '}',
    '',
  ].join('\n');

  var exec = [
    '# Run a command, its output live: one result per',
    '# chunk, then ExecExit. Set "id" in the variables.',
    'subscription Exec($id: ID!) {',
    '  execStream(',
    '    sandboxId: $id',
    '    input: {command: "for i in 1 2 3; do echo line $i; sleep 1; done"}',
    '  ) {',
    '    __typename',
    '    ... on OutputChunk {',
    '      seq',
    '      stream',
    '      data',
    '    }',
    '    ... on OutputTruncated {',
    '      fromSeq',
    '      toSeq',
    '    }',
    '    ... on ExecExit {',
    '      exitCode',
    '      duration',
    '      timedOut',
    '    }',
    '  }',
    '}',
    '',
  ].join('\n');

  var events = [
    '# Sandbox state changes as they happen',
    '# (add sandboxEvents(sandboxId: ...) to watch one).',
    'subscription Events {',
    '  sandboxEvents {',
    '    sandboxId',
    '    state',
    '    reason',
    '    at',
    '  }',
    '}',
    '',
  ].join('\n');

  var health = ['query Health {', '  health {', '    status', '    version', '    uptime', '  }', '}', ''].join(
    '\n',
  );

  var defaultTabs = [
    { query: spawn },
    { query: exec, variables: '{\n  "id": "sb-..."\n}\n' },
    { query: events },
    { query: health },
  ];

  var root = ReactDOM.createRoot(document.getElementById('graphiql'));
  root.render(
    React.createElement(GraphiQL, {
      fetcher: fetcher,
      defaultTabs: defaultTabs,
      defaultEditorToolsVisibility: true,
    }),
  );
})();
