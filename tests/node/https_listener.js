'use strict';
// hyco-https listener (createRelayedServer) for tests/http_mode_hyco.rs. Routes on the
// request target after the hybrid connection's name:
//   echo        200, the request body back; x-got-* headers say what arrived
//   size/N      200, N bytes ((i * 31 + 7) & 255), x-sha256 of them
//   status/N    status N, no body
//   desc        201 "Made Here", body "made"
//   parts       200, three writes with pauses (a streamed response)
//   slow        never answers
//
// env: HC_LISTEN_URI  ws(s)://host:port/$hc/<entity>?sb-hc-action=listen
//      HC_TOKEN | HC_KEY_NAME + HC_KEY   (see lib.js)
//      HC_TIMEOUT_MS  deadline (default 20000)
// out:  LISTENING
//       REQUEST <method> <url>
//       LISTEN_ERROR <message>

const lib = require('./lib');
const uri = lib.need('HC_LISTEN_URI');
lib.deadline('https listener');
const https = lib.loadHyco('hyco-https');

const factory = lib.tokenFactory(https, uri);
if (!factory) lib.fail('no token: set HC_TOKEN or HC_KEY_NAME and HC_KEY', 64);
const token = process.env.HC_TOKEN ? process.env.HC_TOKEN : factory;

// hyco-https never answers `res.end(emptyBuffer)` (an empty Buffer is truthy, and its
// write path then sends nothing): end empty bodies with `res.end()`.
function endWith(res, data) {
  if (data.length) res.end(data); else res.end();
}

function sized(n) {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + 7) & 255;
  return b;
}

const server = https.createRelayedServer({ server: uri, token: token }, function (req, res) {
  lib.out('REQUEST ' + req.method + ' ' + req.url);
  const route = req.url.split('?')[0].split('/').slice(2).join('/');
  const chunks = [];
  req.on('data', function (c) { chunks.push(Buffer.isBuffer(c) ? c : Buffer.from(c)); });
  req.on('end', function () {
    const body = Buffer.concat(chunks);
    if (route === 'echo') {
      res.writeHead(200, 'OK', {
        'x-got-method': req.method,
        'x-got-url': req.url,
        'x-got-len': String(body.length),
        'x-got-sha256': lib.sha256(body),
        'x-got-headers': Object.keys(req.headers).join(','),
        'x-got-via': req.headers['via'] || '',
      });
      endWith(res, body);
    } else if (route.startsWith('size/')) {
      const data = sized(parseInt(route.slice(5), 10));
      res.writeHead(200, 'OK', { 'x-sha256': lib.sha256(data), 'content-type': 'application/octet-stream' });
      endWith(res, data);
    } else if (route.startsWith('status/')) {
      res.statusCode = parseInt(route.slice(7), 10);
      res.end();
    } else if (route === 'desc') {
      res.writeHead(201, 'Made Here', { 'content-type': 'text/plain' });
      res.end('made');
    } else if (route === 'parts') {
      res.writeHead(200, 'OK', { 'content-type': 'text/plain' });
      res.write('part1,');
      setTimeout(function () {
        res.write('part2,');
        setTimeout(function () { res.end('part3'); }, 50);
      }, 50);
    } else if (route === 'slow') {
      // never answers
    } else {
      res.statusCode = 404;
      res.end('no route ' + route);
    }
  });
});

server.on('listening', function () { lib.out('LISTENING'); });
server.on('error', function (e) { lib.out('LISTEN_ERROR ' + lib.errText(e)); });
server.listen();
