// Minimal relay on uWebSockets.js (npm `uwebsockets@3.0.6`): one topic per URL
// path, so /websocket is one room and /websocket/r7 another (issue 12's rooms);
// every client subscribes to its path's topic and each message is published to
// it. Publishing from a socket skips that socket, so it reaches every other
// client of the room.
// Usage: node uws_relay.js PORT
'use strict';
const uWS = require('uwebsockets');

const port = Number(process.argv[2] || 9301);

uWS.App()
  .ws('/*', {
    compression: uWS.DISABLED,
    maxPayloadLength: 64 * 1024,
    idleTimeout: 0, // no idle timeout, like the other minimal relays
    upgrade: (res, req, context) => {
      // the path is only readable here: keep it on the socket as its topic
      res.upgrade(
        { topic: req.getUrl() },
        req.getHeader('sec-websocket-key'),
        req.getHeader('sec-websocket-protocol'),
        req.getHeader('sec-websocket-extensions'),
        context,
      );
    },
    open: (ws) => {
      ws.subscribe(ws.getUserData().topic);
    },
    message: (ws, message, isBinary) => {
      ws.publish(ws.getUserData().topic, message, isBinary);
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
