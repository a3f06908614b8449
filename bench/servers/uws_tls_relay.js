// uws_relay.js over TLS (uWS.SSLApp): the same one-topic relay, for the TLS
// comparison in docs/benchmarks.md ("TLS"; bench/tls_fanout.py runs it).
// Usage: node uws_tls_relay.js PORT CERT_FILE KEY_FILE
'use strict';
const uWS = require('uwebsockets');

const [port, cert, key] = [Number(process.argv[2] || 9302), process.argv[3], process.argv[4]];
if (!cert || !key) {
  console.error('usage: node uws_tls_relay.js PORT CERT_FILE KEY_FILE');
  process.exit(2);
}

uWS.SSLApp({ cert_file_name: cert, key_file_name: key })
  .ws('/*', {
    compression: uWS.DISABLED,
    maxPayloadLength: 64 * 1024,
    idleTimeout: 0,
    open: (ws) => {
      ws.subscribe('all');
    },
    message: (ws, message, isBinary) => {
      ws.publish('all', message, isBinary);
    },
  })
  .listen('127.0.0.1', port, (token) => {
    if (!token) {
      console.error(`uws: failed to listen on ${port}`);
      process.exit(1);
    }
    const v = require('uwebsockets/package.json').version;
    console.log(`uWebSockets.js (npm uwebsockets ${v}) TLS relay on 127.0.0.1:${port} (node ${process.version})`);
  });
