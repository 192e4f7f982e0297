"""Real processes on loopback for tests and benchmarks: a fake provider, gunicorn, nginx, a raw SSE client."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

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


ADMIN_TOKEN = "test-admin-token"  # every Server below runs with it


def get_json(url, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        return json.load(exc)


def post(url, body=None):
    """POST a JSON body (or none); return (status, parsed JSON)."""
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def full_accept_queue():
    """Return (a listening socket whose accept queue is full, its fillers): a connect() to it hangs."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    fillers = [socket.socket() for _ in range(2)]
    for f in fillers:  # later SYNs are dropped
        f.setblocking(False)
        f.connect_ex(("127.0.0.1", blackhole.getsockname()[1]))
    return blackhole, fillers


def poll(fetch, done, timeout):
    """Call fetch() every 20 ms until done(result) or `timeout` seconds; return the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = fetch()
        if done(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.02)


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
        return poll(lambda: self.record(tag), lambda rec: rec.get("closed_at"), timeout)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Server:
    """A real gunicorn (gevent worker) serving wsgi:app on a free port."""

    def __init__(self, tmp_path, workers=1, args=(), app="wsgi:app", host="127.0.0.1", preexec_fn=None, root=ROOT,
                 wrapper=(), start_timeout=15, **env):
        self.preexec_fn = preexec_fn  # run in the child before gunicorn starts (e.g. to set limits)
        self.start_timeout = start_timeout
        self.root = root  # the checkout to serve (bench/capacity.py --against serves another one)
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        self.db = env.get("GENERATIONS_DB") or str(tmp_path / f"gen-{self.port}.db")
        self.env = {**os.environ, "BIND": f"{host}:{self.port}", "ADMIN_TOKEN": ADMIN_TOKEN,
                    "WEB_CONCURRENCY": str(workers), **{k: str(v) for k, v in env.items()}, "GENERATIONS_DB": self.db}
        self.log_path = tmp_path / f"gunicorn-{self.port}.log"
        self.command = [*wrapper, PYTHON, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--no-control-socket", *args, app]
        self.log = open(self.log_path, "w")
        self._start()

    def _start(self):
        self.proc = subprocess.Popen(self.command, cwd=self.root, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=self.preexec_fn)
        wait_http(self.url + "/healthz", self.start_timeout, proc=self.proc)

    def restart(self):
        """Stop and start again on the same port, dropping every connection it held."""
        self.stop()
        self.log = open(self.log_path, "a")
        self._start()

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

    def list(self, query="limit=20"):
        """Return the log's list answer, as the operator (ADMIN_TOKEN) sees it."""
        return get_json(f"{self.url}/api/generations?{query}", token=ADMIN_TOKEN)

    def generation(self, gen_id):
        return get_json(f"{self.url}/api/generations/{gen_id}")

    def wait_finished(self, gen_id, timeout=5.0):
        """Return the generation's record once it is no longer streaming."""
        return poll(lambda: self.generation(gen_id), lambda rec: rec.get("status") != "streaming", timeout)

    def output(self):
        self.log.flush()
        return self.log_path.read_text()

    def stop(self):
        stop_process(self.proc)
        self.log.close()


def stop_process(proc, timeout=10):
    """Terminate a server process; kill it if it has not exited within `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class SSE:
    """A raw-socket HTTP/1.1 client that reads an event stream event by event, with arrival times."""

    def __init__(self, port, body, path="/api/chat", raw_body=None, content_type="application/json", extra=b"",
                 headers=None, wait_for_headers=True):
        self.sock = socket.create_connection(("127.0.0.1", port))
        data = raw_body if raw_body is not None else json.dumps(body).encode()
        more = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
                          f"Content-Length: {len(data)}\r\n{more}\r\n".encode() + data + extra)
        self.buf = b""
        self.body = b""
        self.closed_at = None
        self.status = None
        if wait_for_headers:
            self._read_head()

    def _read_head(self):
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
        if self.status is None:
            self._read_head()
        while b"\n\n" not in self.body:
            self._fill_body()
        block, self.body = self.body.split(b"\n\n", 1)
        t = time.monotonic()
        text = block.decode()
        if text.startswith(":"):
            return ":", text[1:].strip(), t
        fields = dict(line.split(": ", 1) for line in text.split("\n"))
        try:
            data = json.loads(fields["data"])
        except ValueError:
            data = fields["data"]  # e.g. OpenAI's [DONE], read straight from a provider
        return fields.get("event", "message"), data, t

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
        self.closed_at = time.monotonic()  # before: the peer may react before close() returns
        self.sock.close()
        return self.closed_at


def texts(events):
    return "".join(data["text"] for kind, data, _ in events if kind == "delta")


def scenario(**kw):
    """A chat request whose last message tells the fake upstream what to do."""
    return {"messages": [{"role": "user", "content": json.dumps(kw)}]}


class Nginx:
    """nginx running the shipped server block, on free loopback ports, in front of `server`."""

    def __init__(self, binary, tmp_path, server, read_timeout=None, h2c=False, swaps=(), also_listen=None):
        self.binary = binary
        self.dir = tmp_path / f"nginx-{free_port()}"
        self.dir.mkdir()
        self.port, self.tls_port = free_port(), free_port()
        self.access_log = self.dir / "access.log"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                        "-keyout", str(self.dir / "relay.key"), "-out", str(self.dir / "relay.crt")],
                       check=True, capture_output=True)
        conf = open(os.path.join(ROOT, "deploy", "nginx.conf")).read()
        servers = server if isinstance(server, (list, tuple)) else [server]
        swaps = [*swaps, ("server 127.0.0.1:8000;", " ".join(f"server 127.0.0.1:{s.port};" for s in servers)),
                 ("listen 8080;", f"listen 127.0.0.1:{self.port};"
                                  + (f" listen {also_listen}:{self.port};" if also_listen else "")),
                 # h2c: the HTTP/2 port without TLS (prior knowledge), to test HTTP/2 in the clear.
                 ("listen 8443 ssl http2;", f"listen 127.0.0.1:{self.tls_port} {'' if h2c else 'ssl '}http2;"),
                 ("/etc/nginx/ssl/", f"{self.dir}/"),
                 ("/var/log/nginx/relay.access.log", str(self.access_log))]
        if read_timeout:
            swaps.append(("proxy_read_timeout 60s;", f"proxy_read_timeout {read_timeout};"))
        for old, new in swaps:
            assert old in conf, f"deploy/nginx.conf no longer has {old!r}"
            conf = conf.replace(old, new)
        (self.dir / "relay.conf").write_text(conf)
        temp = "".join(f"{kind}_temp_path {self.dir}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.dir / "nginx.conf").write_text(
            ("user root;\n" if os.geteuid() == 0 else "")
            + f"daemon off;\nworker_processes 1;\npid {self.dir}/nginx.pid;\nerror_log {self.dir}/error.log info;\n"
            f"events {{ worker_connections 1024; }}\nhttp {{\n{temp}include {self.dir}/relay.conf;\n}}\n")
        self.proc = subprocess.Popen([self.binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_http(f"http://127.0.0.1:{self.port}/healthz", proc=self.proc)

    def log_lines(self):
        return self.access_log.read_text().splitlines()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def postgres_bindir():
    """Return the directory of Debian's Postgres server binaries, or None."""
    import glob
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


class Postgres:
    """A real Postgres in a temporary directory on a free loopback port, run as an unprivileged user."""

    def __init__(self, bindir):
        import pwd
        import tempfile
        self.bindir = bindir
        self.port = free_port()
        # Postgres refuses to run as root; as root, run it as nobody in a directory nobody owns.
        self.user = "nobody" if os.geteuid() == 0 else None
        self.dir = tempfile.mkdtemp(prefix="relay-pg-")
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.data = os.path.join(self.dir, "data")
        self._run("initdb", "-D", self.data, "-U", "relay", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.url = f"postgresql://relay@127.0.0.1:{self.port}/postgres"
        self.start()

    def _run(self, tool, *args):
        subprocess.run([os.path.join(self.bindir, tool), *args], check=True, capture_output=True, user=self.user,
                       cwd=self.dir, timeout=60)

    def start(self):
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "log"), "-w", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                  "start")

    def stop(self, mode="fast"):
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def destroy(self):
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)
