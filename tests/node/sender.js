'use strict';
// hyco-ws sender (relayedConnect): sends messages, collects what comes back, closes.
//
// env: HC_SEND_URI        ws(s)://host:port/$hc/<entity>?sb-hc-action=connect
//      HC_TOKEN | HC_KEY_NAME + HC_KEY [+ HC_TOKEN_URI, HC_TOKEN_TTL]   (see lib.js)
//      HC_TOKEN_IN_QUERY=1 put the token in the URL with appendRelayToken instead of
//                          the ServiceBusAuthorization header (needs HC_KEY_NAME/HC_KEY)
//      HC_MESSAGES_FILE    JSON array of {"type":"text"|"binary","b64":"…"} (or HC_MESSAGES inline)
//      HC_COLLECT          "messages" (default): expect one echo per message, in order;
//                          "bytes": expect the concatenated bytes back in any framing
//      HC_PROTOCOL         optional subprotocol (then `new WebSocket` as relayedConnect does)
//      HC_CONNECTIONS      number of concurrent connections (default 1), all opened in the
//                          same tick (ws 1.1.x then sends the same Sec-WebSocket-Key on all)
//      HC_EXPECT_PEER_CLOSE=1  a close by the peer before all replies arrived is an
//                          expected outcome (prints PEER_CLOSE) rather than an error
//      HC_TIMEOUT_MS       deadline (default 20000)
// out (connection numbers c start at 1):
//       OPEN <c> protocol=<p> extensions=<names>
//       SENT <c> <i> text|binary <len> <sha256>
//       RECV <c> text|binary <len> <sha256>     (HC_COLLECT=messages)
//       RECV_BYTES <c> <len> <sha256>            (HC_COLLECT=bytes)
//       COMPLETE <c>            all expected replies arrived (checked against what was sent)
//       MISMATCH <c> <detail>   (exit 1) a reply differs from what was sent
//       CLOSED <c> <code>       after our close handshake completed
//       CLOSE_TIMEOUT <c>       the relay did not complete the close handshake in 5 s
//       DONE                    (exit 0) every connection completed and closed
//       HTTP_STATUS <c> <code> <reason>  (exit 3) handshake refused
//       ERROR <c> <message>     (exit 1)
//       EARLY_CLOSE <c> <code>  (exit 1) closed before all replies arrived
//       PEER_CLOSE <c> <code> <reason>   the same, with HC_EXPECT_PEER_CLOSE=1

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
  return {
    binary: m.type === 'binary',
    buf: buf,
    data: m.type === 'binary' ? buf : buf.toString('utf8'),
    sig: (m.type === 'binary' ? 'binary' : 'text') + ' ' + buf.length + ' ' + lib.sha256(buf),
  };
});
const collect = lib.env('HC_COLLECT', 'messages');
const all = Buffer.concat(messages.map(function (m) { return m.buf; }));
const connections = parseInt(lib.env('HC_CONNECTIONS', '1'), 10);
const expectPeerClose = lib.env('HC_EXPECT_PEER_CLOSE', '') === '1';

let token = null;
if (lib.env('HC_TOKEN_IN_QUERY', '') === '1') {
  uri = hyco.appendRelayToken(uri, lib.need('HC_KEY_NAME'), lib.need('HC_KEY'),
    process.env.HC_TOKEN_TTL ? parseInt(process.env.HC_TOKEN_TTL, 10) : undefined);
} else {
  const f = lib.tokenFactory(hyco, uri);
  token = f ? f() : null;
}

let closed = 0;

function connect(c) {
  let ws;
  if (process.env.HC_PROTOCOL) {
    ws = new hyco(uri, process.env.HC_PROTOCOL, token ? { headers: { ServiceBusAuthorization: token } } : null);
  } else {
    ws = hyco.relayedConnect(uri, token);
  }

  let complete = false;
  let received = 0;
  const chunks = [];
  let receivedBytes = 0;

  function finish() {
    if (complete) return;
    complete = true;
    lib.out('COMPLETE ' + c);
    ws.close(1000, 'done');
    // ws 1.1.x waits 30 s for the peer's Close; report if it does not come soon.
    setTimeout(function () {
      lib.out('CLOSE_TIMEOUT ' + c);
      closedOne();
    }, 5000);
  }

  let counted = false;
  function closedOne() {
    if (counted) return;
    counted = true;
    if (++closed === connections) {
      lib.out('DONE');
      process.exit(0);
    }
  }

  ws.on('unexpected-response', function (req, res) {
    lib.out('HTTP_STATUS ' + c + ' ' + res.statusCode + ' ' + (res.statusMessage || ''));
    process.exit(3);
  });

  ws.on('open', function () {
    lib.out('OPEN ' + c + ' protocol=' + (ws.protocol || '') + ' extensions=' + Object.keys(ws.extensions || {}).join(','));
    messages.forEach(function (m, i) {
      ws.send(m.data, { binary: m.binary }, function (err) {
        if (err) {
          lib.out('ERROR ' + c + ' send ' + i + ': ' + lib.errText(err));
          process.exit(1);
        }
      });
      lib.out('SENT ' + c + ' ' + i + ' ' + m.sig);
    });
    if ((collect === 'bytes' && all.length === 0) || (collect !== 'bytes' && messages.length === 0)) finish();
  });

  ws.on('message', function (data, flags) {
    const binary = !!(flags && flags.binary);
    const buf = Buffer.isBuffer(data) ? data : Buffer.from(data, 'utf8');
    if (complete) {
      lib.out('MISMATCH ' + c + ' unexpected extra message of ' + buf.length + ' bytes');
      process.exit(1);
    }
    if (collect === 'bytes') {
      chunks.push(buf);
      receivedBytes += buf.length;
      if (receivedBytes >= all.length) {
        const got = Buffer.concat(chunks);
        lib.out('RECV_BYTES ' + c + ' ' + got.length + ' ' + lib.sha256(got));
        if (!got.equals(all)) {
          lib.out('MISMATCH ' + c + ' got ' + got.length + ' bytes, sent ' + all.length);
          process.exit(1);
        }
        finish();
      }
    } else {
      const sig = (binary ? 'binary' : 'text') + ' ' + buf.length + ' ' + lib.sha256(buf);
      lib.out('RECV ' + c + ' ' + sig);
      if (sig !== messages[received].sig) {
        lib.out('MISMATCH ' + c + ' reply ' + received + ' is ' + sig + ', sent ' + messages[received].sig);
        process.exit(1);
      }
      if (++received === messages.length) finish();
    }
  });

  ws.on('close', function (code, reason) {
    if (complete) {
      lib.out('CLOSED ' + c + ' ' + code);
      closedOne();
      return;
    }
    if (expectPeerClose) {
      lib.out('PEER_CLOSE ' + c + ' ' + code + ' ' + (reason || ''));
      closedOne();
      return;
    }
    lib.out('EARLY_CLOSE ' + c + ' ' + code);
    process.exit(1);
  });

  ws.on('error', function (e) {
    lib.out('ERROR ' + c + ' ' + lib.errText(e));
    process.exit(1);
  });
}

for (let c = 1; c <= connections; c++) connect(c);
