// Peer: Node's `ws` server relaying with a client.send loop (the non-Python reference).
"use strict";
const { WebSocketServer } = require("ws");

const port = Number(process.argv[2]);
const JOINED = '{"type":"system","event":"room.joined"}';
const rooms = new Map();
const wss = new WebSocketServer({ host: "127.0.0.1", port, perMessageDeflate: false, backlog: 4096 });

wss.on("connection", (ws) => {
  const joined = [];
  ws.on("message", (data, isBinary) => {
    const text = data.toString();
    const frame = JSON.parse(text);
    const room = frame.room_id || "";
    if (frame.type === "join") {
      if (!rooms.has(room)) rooms.set(room, new Set());
      rooms.get(room).add(ws);
      joined.push(room);
      ws.send(JOINED);
    } else if (frame.type === "message") {
      for (const member of rooms.get(room) || []) {
        if (member !== ws) member.send(data, { binary: isBinary });
      }
    }
  });
  ws.on("close", () => {
    for (const room of joined) (rooms.get(room) || new Set()).delete(ws);
  });
});
wss.on("listening", () => console.log(`ws ${require("ws/package.json").version} on ${port}`));
