'use strict';
// Makes a token with hyco-ws's own createRelayToken.
//
// usage: node token.js --uri URI --key-name NAME --key KEY [--ttl SECONDS]
//        node token.js --ns NAMESPACE --path ENTITY --key-name NAME --key KEY [--ttl SECONDS]
//        (--ns/--path build the URI with createRelayBaseUri: wss://NAMESPACE:443/$hc/ENTITY)
// out:   URI <uri signed for>
//        SR <decoded audience in the token>
//        TOKEN <token>

const lib = require('./lib');
lib.deadline('token');
const hyco = lib.loadHyco();

const args = {};
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) {
  if (!argv[i].startsWith('--') || i + 1 >= argv.length) lib.fail('bad arguments: ' + argv.join(' '), 64);
  args[argv[i].slice(2)] = argv[i + 1];
}
let uri = args.uri;
if (!uri) {
  if (!args.ns || !args.path) lib.fail('need --uri, or --ns and --path', 64);
  uri = hyco.createRelayBaseUri(args.ns, args.path);
}
if (!args['key-name'] || !args.key) lib.fail('need --key-name and --key', 64);
const ttl = args.ttl !== undefined ? parseInt(args.ttl, 10) : undefined;
const token = hyco.createRelayToken(uri, args['key-name'], args.key, ttl);
const sr = /(?:^SharedAccessSignature |&)sr=([^&]*)/.exec(token);
lib.out('URI ' + uri);
lib.out('SR ' + (sr ? decodeURIComponent(sr[1]) : ''));
lib.out('TOKEN ' + token);
process.exit(0);
