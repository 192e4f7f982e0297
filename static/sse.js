// Server-Sent Events over fetch(): EventSource can only GET and cannot be aborted per
// request, so the page POSTs with fetch and parses the body itself, following
// https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation

/** Yield {event, data} for each event of a fetch Response body; comments are dropped. */
export async function* readEvents(body) {
  // TextDecoderStream keeps a UTF-8 character split across network chunks whole.
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new EventParser();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      yield* parser.feed(value);
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** Turns text, fed in pieces of any size, into events. */
export class EventParser {
  constructor() {
    this.buffer = "";
    this.event = "";
    this.data = [];
  }

  *feed(text) {
    this.buffer += text;
    const lineEnd = /\r\n|\r|\n/g;
    let start = 0;
    let match;
    while ((match = lineEnd.exec(this.buffer))) {
      // A lone \r at the end may be the first half of a \r\n still on its way.
      if (match[0] === "\r" && lineEnd.lastIndex === this.buffer.length) break;
      const event = this.line(this.buffer.slice(start, match.index));
      start = lineEnd.lastIndex;
      if (event) yield event;
    }
    this.buffer = this.buffer.slice(start);
  }

  line(line) {
    if (line === "") {
      const event = this.data.length ? { event: this.event || "message", data: this.data.join("\n") } : null;
      this.event = "";
      this.data = [];
      return event;
    }
    if (line.startsWith(":")) return null; // a comment, e.g. the relay's keepalive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
    return null;
  }
}
