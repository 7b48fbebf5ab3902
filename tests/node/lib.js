'use strict';
// Shared helpers for the hyco-ws compatibility scripts (driven by tests/compat_hyco.rs).
//
// Output protocol: one event per stdout line, `WORD arg arg…`, so the Rust side can match
// lines. Failures print `FAIL <message>` and exit non-zero; every script has a deadline
// (HC_TIMEOUT_MS, default 20000) after which it prints `TIMEOUT …` and exits 124.

const crypto = require('crypto');
const path = require('path');

function out(line) {
  process.stdout.write(line + '\n');
}

function fail(msg, code) {
  out('FAIL ' + msg);
  process.stderr.write('FAIL ' + msg + '\n');
  process.exit(code || 1);
}

function need(name) {
  const v = process.env[name];
  if (v === undefined || v === '') fail('environment variable ' + name + ' is required', 64);
  return v;
}

function env(name, dflt) {
  const v = process.env[name];
  return v === undefined || v === '' ? dflt : v;
}

// Exits with 124 after HC_TIMEOUT_MS (default 20 s) whatever happens.
function deadline(what) {
  const ms = parseInt(env('HC_TIMEOUT_MS', '20000'), 10);
  setTimeout(function () {
    out('TIMEOUT ' + what + ' after ' + ms + ' ms');
    process.stderr.write('TIMEOUT ' + what + ' after ' + ms + ' ms\n');
    process.exit(124);
  }, ms);
}

// Loads hyco-ws (or `name`, e.g. hyco-https) from the rig installed by scripts/setup-node.sh.
function loadHyco(name) {
  name = name || 'hyco-ws';
  const candidates = [];
  if (process.env.HYRELAY_NODE_RIG) {
    candidates.push(path.join(process.env.HYRELAY_NODE_RIG, 'node_modules', name));
  }
  candidates.push(path.join(__dirname, '..', '..', 'target', 'node-rig', 'node_modules', name));
  let last = null;
  for (const c of candidates) {
    try {
      return require(c);
    } catch (e) {
      if (e.code !== 'MODULE_NOT_FOUND') throw e;
      last = e;
    }
  }
  fail('cannot load ' + name + ' (looked in ' + candidates.join(', ') + '): ' +
       (last && last.message.split('\n')[0]) + '; run scripts/setup-node.sh', 65);
}

function sha256(buf) {
  return crypto.createHash('sha256').update(buf).digest('hex');
}

function errText(e) {
  if (e === null || e === undefined) return 'unknown error';
  if (typeof e === 'string') return e;
  return e.message || String(e);
}

// The token a script presents: HC_TOKEN verbatim, else one made with the package's own
// createRelayToken for HC_TOKEN_URI (default: `uri`) from HC_KEY_NAME/HC_KEY, else null.
function tokenFactory(hyco, uri) {
  if (process.env.HC_TOKEN) {
    const t = process.env.HC_TOKEN;
    return function () { return t; };
  }
  if (process.env.HC_KEY_NAME && process.env.HC_KEY) {
    const audience = env('HC_TOKEN_URI', uri);
    const ttl = process.env.HC_TOKEN_TTL ? parseInt(process.env.HC_TOKEN_TTL, 10) : undefined;
    return function () {
      return hyco.createRelayToken(audience, process.env.HC_KEY_NAME, process.env.HC_KEY, ttl);
    };
  }
  return null;
}

module.exports = { out, fail, need, env, deadline, loadHyco, sha256, errText, tokenFactory };
