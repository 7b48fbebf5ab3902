'use strict';
// hyco-ws listener (RelayedServer) that echoes every message back with its type.
// Two text messages are commands instead: `__close__ <code>` closes that connection with
// <code>, `__drop__` drops its TCP connection without a Close frame.
//
// env: HC_LISTEN_URI  ws(s)://host:port/$hc/<entity>?sb-hc-action=listen
//      HC_TOKEN | HC_KEY_NAME + HC_KEY [+ HC_TOKEN_URI, HC_TOKEN_TTL]   (see lib.js)
//      HC_EXIT_ON_ERROR=1  exit 3 on the first control-channel error (hyco-ws would
//                          otherwise reconnect immediately, forever)
//      HC_TIMEOUT_MS       deadline (default 20000)
// out:  LISTENING
//       LISTEN_ERROR <message>
//       CONNECTION <n>
//       OPEN <n> protocol=<p> extensions=<names> target=<accept address path and its
//                non-sb-hc query, i.e. what an application would see as the request URL>
//       MESSAGE <n> text|binary <len> <sha256>
//       CLOSE <n> <code>
//       CONN_ERROR <n> <message>

const lib = require('./lib');
const uri = lib.need('HC_LISTEN_URI');
lib.deadline('listener');
const hyco = lib.loadHyco();
const exitOnError = lib.env('HC_EXIT_ON_ERROR', '') === '1';

const factory = lib.tokenFactory(hyco, uri);
if (!factory) lib.fail('no token: set HC_TOKEN or HC_KEY_NAME and HC_KEY', 64);
// A literal token is passed as a string; a key as a function (hyco-ws's renewing mode).
const token = process.env.HC_TOKEN ? process.env.HC_TOKEN : factory;

let conns = 0;
let errors = 0;

const server = hyco.createRelayedServer({ server: uri, token: token }, function (ws) {
  const n = ++conns;
  lib.out('CONNECTION ' + n);
  ws.on('open', function () {
    lib.out('OPEN ' + n + ' protocol=' + (ws.protocol || '') +
      ' extensions=' + Object.keys(ws.extensions || {}).join(',') + ' target=' + appTarget(ws.url));
  });
  ws.on('message', function (data, flags) {
    const binary = !!(flags && flags.binary);
    const buf = Buffer.isBuffer(data) ? data : Buffer.from(data, 'utf8');
    lib.out('MESSAGE ' + n + ' ' + (binary ? 'binary' : 'text') + ' ' + buf.length + ' ' + lib.sha256(buf));
    if (!binary && data.startsWith('__close__ ')) {
      // Close this connection with the given code instead of echoing.
      ws.close(parseInt(data.slice('__close__ '.length), 10), 'requested by sender');
      return;
    }
    if (!binary && data === '__drop__') {
      // Drop the TCP connection without a Close frame.
      ws.terminate();
      return;
    }
    ws.send(data, { binary: binary }, function (err) {
      if (err) lib.out('CONN_ERROR ' + n + ' send: ' + lib.errText(err));
    });
  });
  ws.on('close', function (code) {
    lib.out('CLOSE ' + n + ' ' + code);
  });
  ws.on('error', function (e) {
    lib.out('CONN_ERROR ' + n + ' ' + lib.errText(e));
  });
});

server.on('listening', function () {
  const ext = server.controlChannel ? Object.keys(server.controlChannel.extensions || {}) : [];
  lib.out('LISTENING extensions=' + ext.join(','));
});

// The accept address minus scheme/host and minus every sb-hc-* query parameter.
function appTarget(address) {
  const u = new URL(address);
  const kept = [];
  u.searchParams.forEach(function (v, k) {
    if (!k.toLowerCase().startsWith('sb-hc-')) kept.push(encodeURIComponent(k) + '=' + encodeURIComponent(v));
  });
  return u.pathname + (kept.length ? '?' + kept.join('&') : '');
}

server.on('error', function (e) {
  errors++;
  if (errors <= 5) lib.out('LISTEN_ERROR ' + lib.errText(e));
  if (exitOnError) process.exit(3);
  if (errors === 6) lib.out('LISTEN_ERROR (further errors not shown)');
});
