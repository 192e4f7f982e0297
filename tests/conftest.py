"""Real processes on loopback: a fake provider, gunicorn with the gevent worker, a raw SSE client."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=15, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def get_json(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        return json.load(exc)


def require_binary(name):
    """Return the binary's path; skip without it, fail under REQUIRE_E2E=1 (CI)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package {name})"
        if os.environ.get("REQUIRE_E2E") == "1":
            pytest.fail(message + " and REQUIRE_E2E=1")
        pytest.skip(message)
    return path


class Upstream:
    """The fake provider process; record(tag) tells what it saw."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([PYTHON, os.path.join(ROOT, "tests", "fake_upstream.py"), str(self.port)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def record(self, tag):
        return get_json(f"{self.url}/_log/{tag}")

    def wait_closed(self, tag, timeout=5.0):
        """Return the record once the relay has closed that request's connection."""
        deadline = time.monotonic() + timeout
        while True:
            rec = self.record(tag)
            if rec.get("closed_at") or time.monotonic() > deadline:
                return rec
            time.sleep(0.02)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Server:
    """A real gunicorn (gevent worker) serving wsgi:app on a free port."""

    def __init__(self, tmp_path, workers=1, args=(), **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = env.get("GENERATIONS_DB") or str(tmp_path / f"gen-{self.port}.db")
        self.env = {**os.environ, "BIND": f"127.0.0.1:{self.port}",
                    "WEB_CONCURRENCY": str(workers), **{k: str(v) for k, v in env.items()}, "GENERATIONS_DB": self.db}
        self.log_path = tmp_path / f"gunicorn-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([PYTHON, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--no-control-socket", *args, "wsgi:app"],
                                     cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_http(self.url + "/healthz", proc=self.proc)

    def workers(self):
        """Return the pids of gunicorn's worker processes."""
        kids = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                            kids.append(int(pid))
                except OSError:
                    pass
        return kids

    def generation(self, gen_id):
        return get_json(f"{self.url}/api/generations/{gen_id}")

    def wait_finished(self, gen_id, timeout=5.0):
        """Return the generation's record once it is no longer streaming."""
        deadline = time.monotonic() + timeout
        while True:
            rec = self.generation(gen_id)
            if rec.get("status") != "streaming" or time.monotonic() > deadline:
                return rec
            time.sleep(0.02)

    def output(self):
        self.log.flush()
        return self.log_path.read_text()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class SSE:
    """A raw-socket HTTP/1.1 client that reads an event stream event by event, with arrival times."""

    def __init__(self, port, body, path="/api/chat", raw_body=None, content_type="application/json", extra=b"",
                 headers=None):
        self.sock = socket.create_connection(("127.0.0.1", port))
        data = raw_body if raw_body is not None else json.dumps(body).encode()
        more = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
                          f"Content-Length: {len(data)}\r\n{more}\r\n".encode() + data + extra)
        self.buf = b""
        self.body = b""
        self.closed_at = None
        head = self._read_until(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if l)}
        self.chunked = self.headers.get("transfer-encoding") == "chunked"

    def _recv(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buf += data

    def _read_until(self, sep):
        while sep not in self.buf:
            self._recv()
        out, self.buf = self.buf.split(sep, 1)
        return out

    def _fill_body(self):
        """Move at least one more byte of decoded body into self.body."""
        if not self.chunked:
            if not self.buf:
                self._recv()
            self.body, self.buf = self.body + self.buf, b""
            return
        size = int(self._read_until(b"\r\n"), 16)
        if size == 0:
            raise EOFError
        while len(self.buf) < size + 2:
            self._recv()
        self.body, self.buf = self.body + self.buf[:size], self.buf[size + 2:]

    def next(self, timeout=10.0):
        """Return the next event or comment as (kind, data, arrival time); kind is the event name or ':'."""
        self.sock.settimeout(timeout)
        while b"\n\n" not in self.body:
            self._fill_body()
        block, self.body = self.body.split(b"\n\n", 1)
        t = time.monotonic()
        text = block.decode()
        if text.startswith(":"):
            return ":", text[1:].strip(), t
        fields = dict(line.split(": ", 1) for line in text.split("\n"))
        return fields.get("event", "message"), json.loads(fields["data"]), t

    def read_all(self, timeout=10.0):
        """Read events until the stream ends; return them (comments included)."""
        events = []
        try:
            while True:
                events.append(self.next(timeout))
        except EOFError:
            return events

    def read_until(self, kind, count=1, timeout=10.0):
        """Read until `count` events of `kind` have arrived; return all read."""
        events = []
        while sum(1 for e in events if e[0] == kind) < count:
            events.append(self.next(timeout))
        return events

    def close(self):
        self.sock.close()
        self.closed_at = time.monotonic()
        return self.closed_at


def texts(events):
    return "".join(data["text"] for kind, data, _ in events if kind == "delta")


def scenario(**kw):
    """A chat request whose last message tells the fake upstream what to do."""
    return {"messages": [{"role": "user", "content": json.dumps(kw)}]}


@pytest.fixture(scope="session")
def upstream():
    up = Upstream()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def relay(upstream, tmp_path_factory):
    """gunicorn relaying to the fake provider (OpenAI format), short keepalive and timeouts."""
    server = Server(tmp_path_factory.mktemp("relay"), LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1",
                    LLM_MODEL="gpt-test", LLM_API_KEY="sk-test-SECRET-KEY", KEEPALIVE_SECONDS=0.5,
                    UPSTREAM_CONNECT_TIMEOUT=1, UPSTREAM_READ_TIMEOUT=3)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """gunicorn with the embedded demo model (two workers, as deployed)."""
    server = Server(tmp_path_factory.mktemp("demo"), workers=2, KEEPALIVE_SECONDS=0.5, DEMO_TOKENS_PER_SECOND=50)
    yield server
    server.stop()
