#!/usr/bin/env node
// proxy-chain (https://github.com/apify/proxy-chain) as a benchmark peer: a forward proxy on 127.0.0.1:$PORT with no
// client authentication that chains every request, CONNECT and plain HTTP alike, to the upstream proxy $UPSTREAM
// (e.g. http://puser:ppass@127.0.0.1:18888), the way Crawlee/Apify users run it.
//
//   PORT=18081 UPSTREAM=http://puser:ppass@127.0.0.1:18888 node server.js
//
// PORT=0 picks a free port. Prints exactly one line, `listening <port>`, on stdout once it accepts connections, and
// nothing per request. Exits 0 on SIGTERM/SIGINT, 2 on a bad environment, 1 if it cannot listen.
'use strict';

const { Server } = require('proxy-chain');

const fail = (code, msg) => {
  process.stderr.write(`proxy-chain peer: ${msg}\n`);
  process.exit(code);
};

const port = Number(process.env.PORT ?? '');
if (process.env.PORT === undefined || !Number.isInteger(port) || port < 0 || port > 65535) {
  fail(2, `PORT must be a port number (0 for any free port), got ${JSON.stringify(process.env.PORT)}`);
}
const upstream = process.env.UPSTREAM;
try {
  if (!upstream || !new URL(upstream).host) throw new Error('no host');
} catch {
  fail(2, `UPSTREAM must be a proxy URL such as http://user:pass@127.0.0.1:18888, got ${JSON.stringify(upstream)}`);
}

const server = new Server({
  host: '127.0.0.1',
  port,
  verbose: false,
  // Called for every request (each CONNECT and each plain HTTP request); no requestAuthentication, so no client auth.
  prepareRequestFunction: () => ({ upstreamProxyUrl: upstream }),
});

server.listen().then(
  () => process.stdout.write(`listening ${server.port}\n`),
  (err) => fail(1, `cannot listen on 127.0.0.1:${port}: ${err.message}`),
);

const stop = () => {
  // close(true) destroys open connections too, so keep-alive clients cannot hold the exit up.
  server.close(true).finally(() => process.exit(0));
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
