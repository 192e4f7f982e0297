"""No input gets a 5xx or a traceback, and the worker still serves afterwards (real gunicorn, raw sockets)."""
import json
import socket
from urllib.parse import quote

from hypothesis import HealthCheck, example, given, settings, strategies as st

from harness import ADMIN_TOKEN, get_json

# Every route with the method it serves: most requests hit a real handler, not a 404 or 405.
ROUTES = {"/api/chat": "POST", "/api/generations": "GET", "/api/generations/gen_0123456789abcdef": "GET",
          "/api/generations/gen_0123456789abcdef/stop": "POST", "/api/generations/gen_x/lease": "POST",
          "/healthz": "GET", "/metrics": "GET", "/": "GET", "/favicon.ico": "GET", "/static/app.js": "GET",
          "/demo/v1/chat/completions": "POST", "/demo/v1/requests/x": "GET"}
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"]

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=12)
chat_like = st.fixed_dictionaries({}, optional={
    "messages": st.lists(st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "x", 1]),
                                                             "content": json_values}), max_size=3) | json_values,
    "max_tokens": json_values, "id": json_values, "lease_seconds": json_values})
bodies = st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                   chat_like.map(lambda v: json.dumps(v).encode()),
                   st.integers(1, 5000).map(lambda n: b"[" * n), st.integers(1, 5000).map(lambda n: b'{"a":' * n))
suffixes = st.one_of(st.just(""), st.just(""), st.just(""),
                     st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), max_size=30).map(lambda t: "/" + t),
                     st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), max_size=20).map(lambda t: "?limit=" + quote(t)))
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40)
headers = st.dictionaries(st.sampled_from(["Content-Type", "Authorization", "X-Forwarded-For", "Accept",
                                           "Accept-Encoding", "Cookie", "X-Custom"]), header_values, max_size=4)


def send(port, method, path, head, body):
    """Send one raw request; return the status code, or None if the server closed without one."""
    quoted = path.encode("utf-8", "surrogatepass").replace(b" ", b"%20").replace(b"#", b"%23")
    lines = [method.encode() + b" " + quoted + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close",
             b"Content-Length: %d" % len(body)]
    lines += [k.encode() + b": " + v.encode("latin-1") for k, v in head.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_no_input_gets_a_5xx_or_a_traceback(relay):
    seen = []

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(route=st.sampled_from(sorted(ROUTES)), suffix=suffixes, other_method=st.sampled_from(METHODS),
           real_method=st.integers(0, 4), head=headers, body=bodies, token=st.booleans(), json_type=st.integers(0, 4))
    # Found by fuzzing before: 100,000 nested [ was a RecursionError (500); "²" passed isdigit().
    @example(route="/api/chat", suffix="", other_method="GET", real_method=1, head={}, body=b"[" * 100_000,
             token=False, json_type=1)
    @example(route="/api/generations", suffix="?limit=%C2%B2", other_method="GET", real_method=1, head={}, body=b"",
             token=True, json_type=0)
    def one(route, suffix, other_method, real_method, head, body, token, json_type):
        method = ROUTES[route] if real_method else other_method
        path = route + suffix
        head = dict(head)
        if token:
            head["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        if json_type:  # mostly JSON, so bodies reach the parser
            head["Content-Type"] = "application/json"
        status = send(relay.port, method, path, head, body)
        seen.append(status)
        assert status is None or status < 500, (method, path, head, body[:200], status)

    one()
    assert len(seen) >= 400 and any(s == 400 for s in seen) and any(s == 200 for s in seen)
    output = relay.output()
    assert "Traceback" not in output and " 500 " not in output
    assert get_json(relay.url + "/healthz")["status"] == "ok"  # the worker still serves
