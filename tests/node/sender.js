'use strict';
// hyco-ws sender (relayedConnect): sends messages, collects what comes back, closes.
//
// env: HC_SEND_URI        ws(s)://host:port/$hc/<entity>?sb-hc-action=connect
//      HC_TOKEN | HC_KEY_NAME + HC_KEY [+ HC_TOKEN_URI, HC_TOKEN_TTL]   (see lib.js)
//      HC_TOKEN_IN_QUERY=1 put the token in the URL with appendRelayToken instead of
//                          the ServiceBusAuthorization header (needs HC_KEY_NAME/HC_KEY)
//      HC_MESSAGES_FILE    JSON array of {"type":"text"|"binary","b64":"…"} (or HC_MESSAGES inline)
//      HC_COLLECT          "messages" (default): expect one echo per message;
//                          "bytes": expect the concatenated bytes back in any framing
//      HC_PROTOCOL         optional subprotocol (then `new WebSocket` as relayedConnect does)
//      HC_TIMEOUT_MS       deadline (default 20000)
// out:  OPEN protocol=<p>
//       SENT <i> text|binary <len> <sha256>
//       RECV text|binary <len> <sha256>          (HC_COLLECT=messages)
//       RECV_BYTES <len> <sha256>                 (HC_COLLECT=bytes)
//       DONE
//       CLOSED <code>           after our close handshake completed
//       HTTP_STATUS <code> <reason>  (exit 3) handshake refused
//       ERROR <message>         (exit 1)
//       EARLY_CLOSE <code>      (exit 1) closed before all replies arrived

const fs = require('fs');
const lib = require('./lib');
let uri = lib.need('HC_SEND_URI');
lib.deadline('sender');
const hyco = lib.loadHyco();

let messages;
if (process.env.HC_MESSAGES_FILE) {
  messages = JSON.parse(fs.readFileSync(process.env.HC_MESSAGES_FILE, 'utf8'));
} else {
  messages = JSON.parse(lib.env('HC_MESSAGES', '[]'));
}
messages = messages.map(function (m) {
  const buf = Buffer.from(m.b64, 'base64');
  return { binary: m.type === 'binary', buf: buf, data: m.type === 'binary' ? buf : buf.toString('utf8') };
});
const collect = lib.env('HC_COLLECT', 'messages');
const expectBytes = messages.reduce(function (a, m) { return a + m.buf.length; }, 0);

let token = null;
if (lib.env('HC_TOKEN_IN_QUERY', '') === '1') {
  uri = hyco.appendRelayToken(uri, lib.need('HC_KEY_NAME'), lib.need('HC_KEY'),
    process.env.HC_TOKEN_TTL ? parseInt(process.env.HC_TOKEN_TTL, 10) : undefined);
} else {
  const f = lib.tokenFactory(hyco, uri);
  token = f ? f() : null;
}

let ws;
if (process.env.HC_PROTOCOL) {
  ws = new hyco(uri, process.env.HC_PROTOCOL, token ? { headers: { ServiceBusAuthorization: token } } : null);
} else {
  ws = hyco.relayedConnect(uri, token);
}

let done = false;
let received = 0;
const chunks = [];
let receivedBytes = 0;

function finish() {
  if (done) return;
  done = true;
  lib.out('DONE');
  ws.close(1000, 'done');
  // ws 1.1.x waits 30 s for the peer's Close; report if it never comes.
  setTimeout(function () {
    lib.out('CLOSE_TIMEOUT');
    process.exit(0);
  }, 5000);
}

ws.on('unexpected-response', function (req, res) {
  lib.out('HTTP_STATUS ' + res.statusCode + ' ' + (res.statusMessage || ''));
  process.exit(3);
});

ws.on('open', function () {
  lib.out('OPEN protocol=' + (ws.protocol || ''));
  messages.forEach(function (m, i) {
    ws.send(m.data, { binary: m.binary }, function (err) {
      if (err) lib.fail('send ' + i + ': ' + lib.errText(err));
    });
    lib.out('SENT ' + i + ' ' + (m.binary ? 'binary' : 'text') + ' ' + m.buf.length + ' ' + lib.sha256(m.buf));
  });
  if ((collect === 'bytes' && expectBytes === 0) || (collect !== 'bytes' && messages.length === 0)) finish();
});

ws.on('message', function (data, flags) {
  const binary = !!(flags && flags.binary);
  const buf = Buffer.isBuffer(data) ? data : Buffer.from(data, 'utf8');
  if (collect === 'bytes') {
    chunks.push(buf);
    receivedBytes += buf.length;
    if (receivedBytes >= expectBytes && !done) {
      const all = Buffer.concat(chunks);
      lib.out('RECV_BYTES ' + all.length + ' ' + lib.sha256(all));
      finish();
    }
  } else {
    lib.out('RECV ' + (binary ? 'binary' : 'text') + ' ' + buf.length + ' ' + lib.sha256(buf));
    received++;
    if (received >= messages.length) finish();
  }
});

ws.on('close', function (code) {
  if (done) {
    lib.out('CLOSED ' + code);
    process.exit(0);
  }
  lib.out('EARLY_CLOSE ' + code);
  process.exit(1);
});

ws.on('error', function (e) {
  lib.out('ERROR ' + lib.errText(e));
  process.exit(1);
});
