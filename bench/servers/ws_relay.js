// Minimal relay on Node's `ws`: any text frame is sent to every other client,
// one client.send() each. Usage: node ws_relay.js PORT
'use strict';
const { WebSocketServer, WebSocket } = require('ws');

const port = Number(process.argv[2] || 9300);
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false, backlog: 4096 });

wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    for (const client of wss.clients) {
      if (client !== ws && client.readyState === WebSocket.OPEN) {
        client.send(data, { binary: isBinary });
      }
    }
  });
  ws.on('error', () => {});
});

wss.on('listening', () => {
  const v = require('ws/package.json').version;
  console.log(`ws ${v} relay on 127.0.0.1:${port} (node ${process.version})`);
});
