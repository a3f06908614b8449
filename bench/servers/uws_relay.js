// Minimal relay on uWebSockets.js (npm `uwebsockets@3.0.6`): every client
// subscribes to one topic and each message is published to it; publishing from a
// socket skips that socket, so it reaches every other client.
// Usage: node uws_relay.js PORT
'use strict';
const uWS = require('uwebsockets');

const port = Number(process.argv[2] || 9301);

uWS.App()
  .ws('/*', {
    compression: uWS.DISABLED,
    maxPayloadLength: 64 * 1024,
    idleTimeout: 0, // no idle timeout, like the other minimal relays
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
    console.log(`uWebSockets.js (npm uwebsockets ${v}) relay on 127.0.0.1:${port} (node ${process.version})`);
  });
