"""The deployment doctor: checks a live deployment's whole chain from outside, in one command.

    .venv/bin/python -m doctor https://chat.example.com --token "$ADMIN_TOKEN" [--json] [--long]
                               [--duration SECONDS] [--cacert FILE | --insecure]

Each check prints PASS, WARN or FAIL with what it measured and, when it fails, which
setting to change and where. Exit status 1 on any FAIL. The server's half is
diagnostics.py: streams that cost no tokens, through the same code as a chat.
"""
import argparse
import json
import socket
import ssl
import sys
import time
import uuid
import zlib
from urllib.parse import urlsplit

BROWSER = {"Accept": "text/event-stream", "Accept-Encoding": "gzip, deflate, br, zstd"}


class Result:
    """One check's outcome."""

    def __init__(self, name, status, measured, fix=""):
        self.name, self.status, self.measured, self.fix = name, status, measured, fix

    def as_dict(self):
        return {"check": self.name, "status": self.status, "measured": self.measured, "fix": self.fix or None}


class Stream:
    """One HTTP/1.1 request on its own connection, read event by event with arrival times."""

    def __init__(self, doctor, method, path, body=None, headers=None, wait_head=True):
        self.sock = doctor.connect(["http/1.1"])
        data = json.dumps(body).encode() if body is not None else b""
        head = {"Host": doctor.host, "Content-Type": "application/json", "Content-Length": str(len(data)),
                "Authorization": f"Bearer {doctor.token}", **(headers or {})}
        self.sent = time.monotonic()
        self.sock.sendall(f"{method} {path} HTTP/1.1\r\n".encode()
                          + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode() + b"\r\n" + data)
        self.buf, self.text, self.first_byte, self.status = b"", "", None, None
        if wait_head:  # else read with the first event: a buffering proxy may hold even the headers back
            self._read_head()

    def _read_head(self):
        self.status, self.headers = self._head()
        self.chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        encoding = self.headers.get("content-encoding", "").lower()
        self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else (
            zlib.decompressobj() if encoding == "deflate" else None)
        self.compressed = bool(encoding) and encoding != "identity"

    def _recv(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        if self.first_byte is None:
            self.first_byte = time.monotonic()
        self.buf += data

    def _head(self):
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        return int(lines[0].split()[1]), headers

    def _more(self):
        """Decode at least one more byte of body into self.text."""
        if self.chunked:
            while b"\r\n" not in self.buf:
                self._recv()
            size = int(self.buf.split(b"\r\n", 1)[0].split(b";")[0], 16)
            if size == 0:
                raise EOFError
            while len(self.buf) < self.buf.index(b"\r\n") + 2 + size + 2:
                self._recv()
            start = self.buf.index(b"\r\n") + 2
            chunk, self.buf = self.buf[start:start + size], self.buf[start + size + 2:]
        else:
            if not self.buf:
                self._recv()
            chunk, self.buf = self.buf, b""
        if self.inflate is not None:
            chunk = self.inflate.decompress(chunk)
        self.text += chunk.decode("utf-8", "replace").replace("\r\n", "\n")

    def next(self, timeout):
        """Return the next (event name, data, arrival time); comments come as (":", text, time)."""
        self.sock.settimeout(timeout)
        if self.status is None:
            self._read_head()
        while "\n\n" not in self.text:
            self._more()
        block, self.text = self.text.split("\n\n", 1)
        arrived = time.monotonic()
        if block.startswith(":"):
            return ":", block[1:].strip(), arrived
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        try:
            data = json.loads(fields.get("data", "null"))
        except ValueError:
            data = fields.get("data")
        return fields.get("event", "message"), data, arrived

    def events(self, timeout):
        """Yield events until the stream ends; a silence longer than `timeout` raises socket.timeout."""
        try:
            while True:
                yield self.next(timeout)
        except EOFError:
            return

    def close(self):
        closed = time.monotonic()
        try:
            self.sock.close()
        except OSError:
            pass
        return closed


class Doctor:
    """Runs the checks against one deployment."""

    def __init__(self, url, token, context=None):
        parts = urlsplit(url.rstrip("/"))
        self.https = parts.scheme == "https"
        self.host = parts.netloc
        self.hostname = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.token = token
        self.context = context or ssl.create_default_context()
        self.offset = 0.0  # server clock - local clock, estimated from the ticks

    def connect(self, alpn):
        sock = socket.create_connection((self.hostname, self.port), timeout=10)
        if not self.https:
            return sock
        self.context.set_alpn_protocols(alpn)
        return self.context.wrap_socket(sock, server_hostname=self.hostname)

    def request(self, method, path, body=None):
        """Return (status, JSON body) of a short request."""
        s = Stream(self, method, path, body)
        raw = s.buf
        try:
            if s.chunked:
                while True:
                    s._more()
            else:
                while len(raw) < int(s.headers.get("content-length", "0")):
                    s._recv()
                    raw = s.buf
                s.text = raw.decode()
        except EOFError:
            pass
        s.close()
        try:
            return s.status, json.loads(s.text or "null")
        except ValueError:
            return s.status, None

    def record(self, gen_id):
        return self.request("GET", f"/api/generations/{gen_id}")[1] or {}

    def wait_ended(self, gen_id, within):
        """Poll the record until it is no longer streaming, for `within` seconds; return it."""
        deadline = time.monotonic() + within
        while True:
            rec = self.record(gen_id)
            if rec.get("status") not in ("streaming", None) or time.monotonic() > deadline:
                return rec
            time.sleep(0.05)

    def diagnostic(self, headers=None, lease_seconds=None, head=True, **params):
        """Start a diagnostic stream on the chat's own route (POST /api/chat), so every proxy treats it as a chat."""
        gen_id = "doc_" + uuid.uuid4().hex
        body = {"id": gen_id, "diagnostic": params, **({"lease_seconds": lease_seconds} if lease_seconds else {})}
        return gen_id, Stream(self, "POST", "/api/chat", body, headers=headers, wait_head=head)

    def server_time(self, iso):
        """Turn the record's ISO time into this machine's monotonic clock (through the estimated offset)."""
        from datetime import datetime
        wall = datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
        return wall - self.offset - (time.time() - time.monotonic())

    def learn_offset(self, events):
        """Estimate server minus local wall clock from tick arrivals: the smallest delay is the closest."""
        wall = time.time() - time.monotonic()
        delays = [float(data["text"]) - (arrived + wall) for kind, data, arrived in events if kind == "delta"]
        if delays:
            self.offset = max(delays)  # the tick that came fastest: offset + (at least) zero transit

    # -- the checks ------------------------------------------------------------------------

    def check_setup(self):
        status, body = self.request("GET", "/api/diagnostics")
        if status in (401, 403):
            return Result("access", "FAIL", f"HTTP {status}", "pass the server's ADMIN_TOKEN with --token")
        if status != 200 or not isinstance(body, dict):
            return Result("access", "FAIL", f"HTTP {status} from /api/diagnostics",
                          "is this the relay's URL? (the server needs diagnostics.py, this version)")
        self.keepalive = float(body["keepalive_seconds"])
        return Result("access", "PASS", f"server keepalive {self.keepalive:g} s, instance {body.get('instance_id')}")

    def check_headers(self):
        gen_id, s = self.diagnostic(BROWSER, ticks=1)
        s.close()
        problems = []
        if not s.headers.get("content-type", "").startswith("text/event-stream"):
            problems.append(f"Content-Type {s.headers.get('content-type')!r}")
        if "content-length" in s.headers:
            problems.append("a Content-Length (the stream was buffered whole)")
        if s.compressed:
            problems.append(f"Content-Encoding {s.headers['content-encoding']} (compression holds events back)")
        if problems:
            return Result("headers", "FAIL", "; ".join(problems),
                          "turn compression off for the stream (nginx: `gzip off;` in `location = /api/chat`"
                          " and no text/event-stream in gzip_types; CDN: exclude text/event-stream from compression)")
        return Result("headers", "PASS", "text/event-stream, no Content-Length, no Content-Encoding")

    def check_buffering(self):
        gen_id, s = self.diagnostic(BROWSER, interval=0.1, ticks=12)
        if s.compressed:
            s.close()
            return Result("buffering", "WARN", "not measured: the response is compressed (see headers)")
        events = list(s.events(10))
        self.learn_offset(events)
        arrivals = [arrived for kind, _, arrived in events if kind == "delta"]
        gaps = [(b - a) * 1000 for a, b in zip(arrivals[1:], arrivals[2:])]
        if len(arrivals) < 12 or not gaps:
            return Result("buffering", "FAIL", f"{len(arrivals)} of 12 ticks arrived", "see the other checks")
        lumped = sum(1 for g in gaps if g < 30)
        text = f"ticks every 100 ms arrived {min(gaps):.0f}-{max(gaps):.0f} ms apart"
        if lumped > len(gaps) // 3 or max(gaps) > 400:
            return Result("buffering", "FAIL", text + f" ({lumped} in lumps)",
                          "a proxy buffers the stream: nginx `proxy_buffering off;` in `location = /api/chat`, and"
                          " do not `proxy_ignore_headers X-Accel-Buffering`; other proxies: disable response buffering")
        return Result("buffering", "PASS", text)

    def check_first_byte(self):
        gen_id, s = self.diagnostic(BROWSER, ticks=1)
        try:
            s.next(10)
        finally:
            s.close()
        ms = (s.first_byte - s.sent) * 1000
        if ms > 3000:
            return Result("first byte", "FAIL", f"{ms:.0f} ms", "something queues the request: check proxy and server load")
        return Result("first byte", "PASS" if ms < 1000 else "WARN", f"{ms:.0f} ms to the first byte")

    def check_silence(self, seconds, name="silence"):
        gen_id, s = self.diagnostic(ticks=3, interval=0.1, silence_after=1, silence=seconds)
        try:
            events = list(s.events(seconds + 10))
        except OSError as exc:
            events = [("error", str(exc), time.monotonic())]
        finally:
            s.close()
        kinds = [kind for kind, _, _ in events]
        if kinds.count("delta") == 3 and kinds[-1] == "done":
            return Result(name, "PASS", f"a {seconds:g} s silence survived ({kinds.count(':')} keepalives)")
        self.stop(gen_id)
        return Result(name, "FAIL", f"the stream was cut in a {seconds:g} s silence",
                      f"raise the proxy's idle timeout above {seconds:g} s, or lower KEEPALIVE_SECONDS under it"
                      " (nginx: `proxy_read_timeout` in `location = /api/chat`, longer than KEEPALIVE_SECONDS;"
                      " load balancers: their idle timeout)")

    def check_abort(self):
        # Nothing is read: behind a buffering proxy the ticks may not come through at all.
        gen_id, s = self.diagnostic(ticks=3, interval=0.05, silence_after=2, silence=120, head=False)
        time.sleep(0.5)  # two ticks, then the server is silent: no write of its own can reveal the close
        closed = s.close()
        rec = self.wait_ended(gen_id, within=3)
        if rec.get("status") == "streaming":
            self.stop(gen_id)
            return Result("abort", "FAIL", "the server never saw the client leave (3 s)",
                          "a proxy here does not pass aborts on: the page's stop request and lease cover it"
                          " (nginx: `proxy_ignore_client_abort off;`)")
        seen = (self.server_time(rec["ended_at"]) - closed) * 1000
        measured = f"the server saw the client leave {max(seen, 0):.0f} ms after it closed ({rec.get('cancel_reason')})"
        if seen > 1000:
            return Result("abort", "FAIL", measured, "a proxy passes aborts on only when it next writes: nginx"
                          " `proxy_ignore_client_abort off;` (the page's stop request and lease cover it)")
        return Result("abort", "PASS", measured)

    def stop(self, gen_id):
        return self.request("POST", f"/api/generations/{gen_id}/stop")

    def check_stop_request(self):
        gen_id, s = self.diagnostic(ticks=100000, interval=0.1, head=False)
        try:
            time.sleep(0.5)
            sent = time.monotonic()
            status, body = self.stop(gen_id)
            events = list(s.events(10))
        finally:
            s.close()
        ended = events[-1] if events else None
        if status != 200 or not ended or ended[0] != "cancelled":
            return Result("stop request", "FAIL", f"HTTP {status}, last event {ended and ended[0]}",
                          "POST /api/generations/<id>/stop must reach the relay (route /api/ to it)")
        return Result("stop request", "PASS", f"the stream ended {(ended[2] - sent) * 1000:.0f} ms after the stop request")

    def check_lease(self):
        gen_id, s = self.diagnostic(ticks=100000, interval=0.1, lease_seconds=2, head=False)
        try:
            began = time.monotonic()
            for _ in range(3):  # renewed past its length: it lives on
                time.sleep(1)
                status, body = self.request("POST", f"/api/generations/{gen_id}/lease")
            renewed = time.monotonic()
            alive = status == 200 and body.get("status") == "streaming"
            events = list(s.events(10))  # no more renewals: it must end
        finally:
            s.close()
        rec = self.record(gen_id)
        after = (events[-1][2] - renewed) if events else None
        if not alive or rec.get("cancel_reason") != "lease_expired" or after is None or after > 2 + 1.5:
            return Result("lease", "FAIL", f"renewed: {alive}, ended: {rec.get('cancel_reason')}, "
                          f"{after and round(after, 1)} s after the last renewal",
                          "POST /api/generations/<id>/lease must reach the relay (route /api/ to it)")
        return Result("lease", "PASS", f"renewed 3 times over {renewed - began:.1f} s; ended lease_expired"
                      f" {after:.1f} s after the last renewal (lease 2 s)")

    def check_http2(self):
        if not self.https:
            return Result("http/2", "WARN", "not over https: browsers speak HTTP/2 only over TLS",
                          "serve the page over https (nginx: `listen 443 ssl http2;`)")
        sock = self.connect(["h2", "http/1.1"])
        protocol = sock.selected_alpn_protocol()
        if protocol != "h2":
            sock.close()
            return Result("http/2", "FAIL", f"ALPN chose {protocol}",
                          "enable HTTP/2 (nginx: `listen 443 ssl http2;`): over HTTP/1.1 a browser holds six streams at most")
        try:
            import h2.config
            import h2.connection
            import h2.events
        except ImportError:
            sock.close()
            return Result("http/2", "WARN", "h2 negotiated; reset not tested (pip install h2)")
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        ids, streams = {}, {}
        for name in ("reset", "kept"):
            gen_id = "doc_" + uuid.uuid4().hex
            stream_id = conn.get_next_available_stream_id()
            body = json.dumps({"id": gen_id, "diagnostic": {"ticks": 100000, "interval": 0.1}}).encode()
            conn.send_headers(stream_id, [(":method", "POST"), (":path", "/api/chat"),
                                          (":authority", self.host), (":scheme", "https"),
                                          ("authorization", f"Bearer {self.token}"), ("content-type", "application/json"),
                                          ("content-length", str(len(body)))])
            conn.send_data(stream_id, body, end_stream=True)
            ids[name], streams[stream_id] = gen_id, name
        sock.sendall(conn.data_to_send())
        got = {"reset": 0, "kept": 0}
        sock.settimeout(10)

        def pump(until):
            while time.monotonic() < until:
                data = sock.recv(65536)
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        got[streams[event.stream_id]] += event.data.count(b"event: delta")
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                sock.sendall(conn.data_to_send())
        pump(time.monotonic() + 0.5)
        reset_id = next(sid for sid, name in streams.items() if name == "reset")
        conn.reset_stream(reset_id)
        sock.sendall(conn.data_to_send())
        before = got["kept"]
        pump(time.monotonic() + 1.0)
        rec = self.wait_ended(ids["reset"], within=2)
        kept = self.record(ids["kept"])
        self.stop(ids["kept"])
        sock.close()
        if rec.get("status") == "streaming" or kept.get("status") != "streaming" or got["kept"] <= before:
            return Result("http/2", "FAIL", f"after a reset: that stream {rec.get('status')}, the other"
                          f" {kept.get('status')} ({got['kept'] - before} more ticks)",
                          "the proxy must close the upstream request of a reset stream only (nginx does by default)")
        return Result("http/2", "PASS", f"h2 negotiated; a reset stream ended ({rec.get('cancel_reason')}),"
                      f" the other went on ({got['kept'] - before} ticks after the reset)")

    def check_duration(self, seconds):
        gen_id, s = self.diagnostic(ticks=int(seconds) + 1, interval=1)
        try:
            events = list(s.events(30))
        except OSError:
            events = []
        finally:
            s.close()
        kinds = [kind for kind, _, _ in events]
        if kinds.count("delta") == int(seconds) + 1 and kinds[-1] == "done":
            return Result("duration", "PASS", f"a {seconds:g} s stream was not cut")
        self.stop(gen_id)
        return Result("duration", "FAIL", f"a {seconds:g} s stream was cut after {kinds.count('delta')} s",
                      "a load balancer or proxy limits a response's total time: raise it above your longest answer")

    def run(self, long=False, duration=None):
        """Run every check; return the results."""
        results = [self.check_setup()]
        if results[0].status == "FAIL":
            return results
        checks = [self.check_headers, self.check_buffering, self.check_first_byte,
                  lambda: self.check_silence(2 * self.keepalive), self.check_abort, self.check_stop_request,
                  self.check_lease, self.check_http2]
        if long:
            checks += [lambda: self.check_silence(65, "silence 65 s"), lambda: self.check_silence(105, "silence 105 s")]
        if duration:
            checks.append(lambda: self.check_duration(duration))
        for check in checks:
            try:
                results.append(check())
            except (OSError, EOFError, ValueError, KeyError) as exc:
                name = getattr(check, "__name__", "check").replace("check_", "").replace("_", " ")
                results.append(Result(name, "FAIL", f"{type(exc).__name__}: {exc}", "see the measured error"))
        return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m doctor", description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the deployment's public URL, e.g. https://chat.example.com")
    parser.add_argument("--token", required=True, help="the server's ADMIN_TOKEN")
    parser.add_argument("--json", action="store_true", help="print JSON (for CI) instead of a table")
    parser.add_argument("--long", action="store_true", help="also try 65 s and 105 s silences (common proxy limits)")
    parser.add_argument("--duration", type=float, help="also check that a stream this many seconds long is not cut")
    parser.add_argument("--cacert", help="trust this CA file (e.g. a self-signed certificate)")
    parser.add_argument("--insecure", action="store_true", help="do not verify the certificate")
    args = parser.parse_args(argv)
    context = ssl.create_default_context(cafile=args.cacert)
    if args.insecure:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    results = Doctor(args.url, args.token, context).run(long=args.long, duration=args.duration)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        width = max(len(r.name) for r in results)
        for r in results:
            print(f"{r.status:<4}  {r.name:<{width}}  {r.measured}")
            if r.status == "FAIL" and r.fix:
                print(f"{'':<4}  {'':<{width}}  fix: {r.fix}")
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
