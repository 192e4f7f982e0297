// Unit tests of static/sse.js: node --test tests/js/
import assert from "node:assert/strict";
import { test } from "node:test";
import { EventParser, readEvents } from "../../static/sse.js";

function parse(...pieces) {
  const parser = new EventParser();
  return pieces.flatMap((piece) => [...parser.feed(piece)]);
}

async function fromBytes(...chunks) {
  const body = new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(chunk);
      controller.close();
    },
  });
  const events = [];
  for await (const event of readEvents(body)) events.push(event);
  return events;
}

test("named events with JSON data", () => {
  assert.deepEqual(parse('event: delta\ndata: {"text": "hi"}\n\n'), [{ event: "delta", data: '{"text": "hi"}' }]);
});

test("an event split across chunks at every position", () => {
  const wire = "event: delta\ndata: abc\n\n";
  for (let i = 1; i < wire.length; i++) {
    assert.deepEqual(parse(wire.slice(0, i), wire.slice(i)), [{ event: "delta", data: "abc" }], `split at ${i}`);
  }
});

test("CRLF and CR line ends, including a CRLF split between chunks", () => {
  // The last \r could be half of a \r\n: it counts once the next byte arrives.
  assert.deepEqual(parse("event: a\r\ndata: 1\r\n\r\n", "event: b\rdata: 2\r\r", ":"), [
    { event: "a", data: "1" },
    { event: "b", data: "2" },
  ]);
  assert.deepEqual(parse("data: x\r", "\n\r", "\n"), [{ event: "message", data: "x" }]);
});

test("multi-line data is joined with newlines", () => {
  assert.deepEqual(parse("data: one\ndata: two\ndata:three\n\n"), [{ event: "message", data: "one\ntwo\nthree" }]);
});

test("keepalive comments and events without data are ignored", () => {
  assert.deepEqual(parse(": keepalive\n\nevent: ping\n\n: x\ndata: y\n\n"), [{ event: "message", data: "y" }]);
});

test("an event cut off by the end of the stream is not dispatched", () => {
  assert.deepEqual(parse("data: whole\n\ndata: half"), [{ event: "message", data: "whole" }]);
});

test("UTF-8 split in the middle of a character across network chunks", async () => {
  const bytes = new TextEncoder().encode('event: delta\ndata: {"text": "é€😀"}\n\n');
  const at = bytes.indexOf(0xf0) + 2; // inside the 4-byte emoji
  const events = await fromBytes(bytes.slice(0, 27), bytes.slice(27, at), bytes.slice(at));
  assert.deepEqual(events, [{ event: "delta", data: '{"text": "é€😀"}' }]);
});
