"""A fake model provider in its own process, for tests and benchmarks.

    python tests/fake_upstream.py PORT

Serves OpenAI (POST .../chat/completions), Anthropic (POST /v1/messages) and Ollama
(POST /api/chat) wire formats over raw sockets, so each test controls framing, pacing and
failures. The scenario is JSON in the last user message (keys in DEFAULTS). Every request
is recorded, including when its client closed the connection; GET /_log/<tag> returns the
record, GET /_closed/<prefix> when each request whose tag starts so was closed. Times are
time.monotonic(), which is one clock for all processes on Linux.
"""
import json
import select
import socket
import sys
import threading
import time

import gevent

DEFAULTS = {
    "tag": None,            # name to look the record up by
    "tokens": 5,            # how many text pieces
    "interval": 0.01,       # seconds between pieces
    "text": "tok{i} ",      # piece text; {i} is its index, {t} the monotonic send time
    "pad": 0,               # prefix each piece with this many "x" (very large events)
    "framing": "chunked",   # chunked | close (no Content-Length, no chunking)
    "header_delay": 0,      # silence before the status line
    "silence_after": None,  # after this many pieces ...
    "silence": 0,           # ... go silent this long
    "status": 200,          # an error status instead of a stream
    "error_body": None,     # its body (string), in the provider's own shape
    "headers": {},          # extra response headers
    "end": "normal",        # normal | abrupt (close, no terminal event) | truncate (half an event)
                            # | no_done (OpenAI: finish_reason but no [DONE]) | error (mid-stream error)
                            # | malformed (an unparseable event) | never (stay open)
    "piece_size": 0,        # write each event in pieces of this many bytes (0: whole)
    "unknown_event": False, # send an event type the client must ignore
    "usage": True,
    "deaf": False,          # never look for the client's FIN: notice a close only when a send fails
}

records = {}
lock = threading.Lock()


def openai_events(s):
    for i in range(s["tokens"]):
        yield i, b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": piece(s, i)}, "finish_reason": None}]}).encode() + b"\n\n"
    if s["unknown_event"]:
        yield None, b"event: mystery\ndata: {\"x\": 1}\n\n"
    if s["end"] == "error":
        yield None, b'data: {"error": {"type": "server_error", "message": "The server had an error while processing your request."}}\n\n'
        return
    yield None, b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
    if s["usage"]:
        yield None, b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": %d, "total_tokens": %d}}\n\n' % (s["tokens"], s["tokens"] + 7)
    if s["end"] != "no_done":
        yield None, b"data: [DONE]\n\n"


def anthropic_events(s):
    def ev(name, data):
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
    yield None, ev("message_start", {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-test", "usage": {"input_tokens": 11, "output_tokens": 1}}})
    yield None, ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    yield None, ev("ping", {"type": "ping"})
    for i in range(s["tokens"]):
        yield i, ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece(s, i)}})
    if s["unknown_event"]:
        yield None, ev("mystery_event", {"type": "mystery_event"})
    if s["end"] == "error":
        yield None, ev("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        return
    yield None, ev("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield None, ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": s["tokens"]}})
    yield None, ev("message_stop", {"type": "message_stop"})


def ollama_events(s):
    for i in range(s["tokens"]):
        yield i, json.dumps({"model": "llama3", "created_at": "2024-01-01T00:00:00Z", "message": {"role": "assistant", "content": piece(s, i)}, "done": False}).encode() + b"\n"
    if s["end"] == "error":
        yield None, b'{"error": "model runner has unexpectedly stopped"}\n'
        return
    yield None, json.dumps({"model": "llama3", "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop", "prompt_eval_count": 9, "eval_count": s["tokens"]}).encode() + b"\n"


FORMATS = {"openai": (openai_events, "text/event-stream"), "anthropic": (anthropic_events, "text/event-stream"),
           "ollama": (ollama_events, "application/x-ndjson")}
TRUNCATED = {"openai": b'data: {"choices": [{"index": 0, "delta": {"content": "GARB', "anthropic": b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "GARB',
             "ollama": b'{"message": {"role": "assistant", "content": "GARB'}
MALFORMED = {"openai": b"data: {not json\n\n", "anthropic": b"event: content_block_delta\ndata: {not json\n\n", "ollama": b"{not json\n"}


def piece(s, i):
    return "x" * s["pad"] + s["text"].replace("{i}", str(i))  # {t} is filled in by send()


class ClientGone(Exception):
    pass


def wait(conn, seconds, rec):
    """Sleep, but notice at once if the client closes; record when."""
    if rec.get("deaf"):
        time.sleep(seconds)
        return
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        poller = select.poll()  # not select(): its fds stop at 1024, and benchmarks hold 10,000
        poller.register(conn, select.POLLIN)
        readable = poller.poll(max(0.0, left) * 1000)
        if readable:
            try:
                data = conn.recv(65536, socket.MSG_PEEK)
            except OSError:
                data = b""
            if not data:
                rec["closed_at"] = time.monotonic()
                # When many clients close at once, stamp them all before tearing any down:
                # otherwise the 200th stamp waits behind 199 teardowns and times the instrument.
                gevent.idle()
                raise ClientGone
            if left <= 0:
                return
            time.sleep(min(left, 0.001))  # the client sent more (next request); just wait
        elif left <= 0:
            return


def send(conn, data, s, rec, chunked):
    data = data.replace(b"{t}", b"%.6f" % time.monotonic())
    pieces = [data] if not s["piece_size"] else [data[i:i + s["piece_size"]] for i in range(0, len(data), s["piece_size"])]
    for n, part in enumerate(pieces):
        if n:
            wait(conn, 0.02, rec)
        frame = b"%x\r\n%s\r\n" % (len(part), part) if chunked else part
        try:
            conn.sendall(frame)
        except OSError:
            rec["closed_at"] = rec.get("closed_at") or time.monotonic()
            raise ClientGone


def read_request(conn, buf):
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None, None, None, b""
        buf += data
    head, buf = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(buf) < length:
        data = conn.recv(65536)
        if not data:
            return None, None, None, b""
        buf += data
    return (method, path, headers), buf[:length], headers, buf[length:]


def respond_json(conn, status, body, extra=""):
    data = json.dumps(body).encode()
    conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n{extra}\r\n".encode() + data)


def handle(conn):
    buf = b""
    rec = None
    while True:
        req, body, headers, buf = read_request(conn, buf)
        if req is None:
            if rec is not None and not rec["closed_at"]:
                rec["closed_at"] = time.monotonic()  # closed after a finished response
            return
        method, path, _ = req
        if path.startswith("/_closed/"):  # when each request whose tag starts so was closed (null: open)
            prefix = path[len("/_closed/"):]
            with lock:
                found = {tag: rec["closed_at"] for tag, rec in records.items() if tag.startswith(prefix)}
            respond_json(conn, 200, found)
            continue
        if path.startswith("/_log/"):
            with lock:
                found = records.get(path[len("/_log/"):])
            respond_json(conn, 200 if found else 404, found or {})
            continue
        keep, rec = serve(conn, path, body, headers)
        if not keep:
            return


def serve(conn, path, body, headers):
    """Serve one streaming request; return (may the connection carry another, its record)."""
    payload = json.loads(body or b"{}")
    fmt = "anthropic" if path.endswith("/v1/messages") else "ollama" if path.endswith("/api/chat") else "openai"
    s = dict(DEFAULTS)
    try:
        s.update(json.loads(payload["messages"][-1]["content"]))
    except (ValueError, KeyError, IndexError, TypeError):
        pass
    tag = s["tag"] or f"req{len(records)}"
    rec = {"tag": tag, "format": fmt, "deaf": s["deaf"], "path": path, "request_headers": headers, "request_body": payload,
           "accepted_at": time.monotonic(), "headers_sent_at": None, "closed_at": None, "pieces_sent": 0,
           "piece_times": [], "completed": False}
    with lock:
        records[tag] = rec
    try:
        wait(conn, s["header_delay"], rec)
        chunked = s["framing"] == "chunked"
        extra = "".join(f"{k}: {v}\r\n" for k, v in s["headers"].items())
        if s["status"] != 200:
            data = (s["error_body"] or "").encode()
            conn.sendall(f"HTTP/1.1 {s['status']} Error\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n{extra}\r\n".encode() + data)
            rec["headers_sent_at"] = time.monotonic()
            return True, rec
        framing = "Transfer-Encoding: chunked\r\n" if chunked else "Connection: close\r\n"
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: {FORMATS[fmt][1]}\r\nx-request-id: up-{tag}\r\nrequest-id: up-{tag}\r\n{framing}{extra}\r\n".encode())
        rec["headers_sent_at"] = time.monotonic()
        for i, data in FORMATS[fmt][0](s):
            if i is not None:
                if s["silence_after"] is not None and i == s["silence_after"]:
                    wait(conn, s["silence"], rec)
                wait(conn, s["interval"], rec)
                if s["end"] in ("abrupt", "truncate", "malformed") and i == s["tokens"] - 1 and s["tokens"] > 0:
                    send(conn, data, s, rec, chunked)
                    rec["pieces_sent"] += 1
                    rec["piece_times"].append(time.monotonic())
                    break
            send(conn, data, s, rec, chunked)
            if i is not None:
                rec["pieces_sent"] += 1
                rec["piece_times"].append(time.monotonic())
        else:
            if s["end"] == "never":
                wait(conn, 3600, rec)
            if chunked:
                conn.sendall(b"0\r\n\r\n")
            rec["completed"] = True
            return chunked, rec
        # Misbehaviour at the end: half an event or garbage, then an abrupt close.
        extra_bytes = {"truncate": TRUNCATED[fmt], "malformed": MALFORMED[fmt]}.get(s["end"], b"")
        if extra_bytes:
            send(conn, extra_bytes, s, rec, chunked)
        return False, rec
    except ClientGone:
        return False, rec


def serve_forever(port):
    server = socket.create_server(("127.0.0.1", port), backlog=1024)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()

        def run(conn=conn):
            try:
                handle(conn)
            except OSError:
                pass
            finally:
                conn.close()

        threading.Thread(target=run, daemon=True).start()


if __name__ == "__main__":
    # One OS thread on epoll: with a thread per connection, 200 connections closing at once
    # queue for the GIL and the instrument itself adds tens of ms to what it measures.
    from gevent import monkey
    monkey.patch_all()
    serve_forever(int(sys.argv[1]))
