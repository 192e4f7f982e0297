"""The copied core keeps its promise on every server a Flask team runs: gevent, gthread and `flask run`.

sse.py and examples/myapp.py (the README's snippet, checked equal below) are copied into an
empty directory, as a user would, and served by each server as a real process.
"""
import os
import re
import shutil
import socket
import subprocess
import time
import uuid

import pytest

from harness import PYTHON, ROOT, SSE, free_port, full_accept_queue, open_fds, poll, scenario, stop_process

SERVERS = {
    # --no-control-socket: several gunicorns at once in the tests would share one.
    "gevent": ["-m", "gunicorn", "--no-control-socket", "-k", "gevent", "myapp:app"],
    # The snippet as it was before init_app: every event handed to the writer's greenlet.
    "gevent, no init_app": ["-m", "gunicorn", "--no-control-socket", "-k", "gevent", "myapp:app"],
    "gthread": ["-m", "gunicorn", "--no-control-socket", "-k", "gthread", "--threads", "16", "myapp:app"],
    "flask run": ["-m", "flask", "--app", "myapp", "run"],
}


def tag():
    return uuid.uuid4().hex[:12]


def wait_port(port, proc, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class CopiedApp:
    """myapp.py + sse.py in a fresh directory, served by one server."""

    def __init__(self, tmp_path, server, upstream, args=(), **env):
        for name in ("sse.py", os.path.join("examples", "myapp.py")):
            shutil.copy(os.path.join(ROOT, name), tmp_path)
        if server.endswith("no init_app"):
            myapp = tmp_path / "myapp.py"
            myapp.write_text(re.sub(r"\ninit_app\(app\).*", "", myapp.read_text()))
            assert "init_app(app)" not in myapp.read_text()
        self.port = free_port()
        bind = ["--port", str(self.port)] if server == "flask run" else ["-b", f"127.0.0.1:{self.port}"]
        self.log_path = tmp_path / f"{server.replace(' ', '-')}-{self.port}.log"
        self.log = open(self.log_path, "w")
        env = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}, "KEEPALIVE": "0.5",
               "UPSTREAM_URL": upstream.url + "/v1/chat/completions", **env}
        self.proc = subprocess.Popen([PYTHON, *SERVERS.get(server, ()), *args, *bind], cwd=tmp_path, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc)

    def output(self):
        self.log.flush()
        return self.log_path.read_text()

    def stop(self):
        stop_process(self.proc)
        self.log.close()


@pytest.fixture(scope="module", params=list(SERVERS))
def app(request, upstream, tmp_path_factory):
    served = CopiedApp(tmp_path_factory.mktemp("copied"), request.param, upstream)
    served.name = request.param
    yield served
    served.stop()


def test_the_readme_snippet_is_the_file_the_tests_run():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"## Copy the core.*?```python\n(.*?)```", readme, re.S).group(1)
    assert block == open(os.path.join(ROOT, "examples", "myapp.py")).read()


def test_a_complete_stream(app, upstream):
    events = SSE(app.port, scenario(tokens=4), path="/stream").read_all()
    text = "".join(str(data) for kind, data, _ in events if kind == "delta")
    assert all(f"tok{i} " in text for i in range(4)) and "[DONE]" in text


@pytest.mark.parametrize("phase", ["tokens flowing", "before headers", "silence"])
def test_stop_closes_the_provider_connection_in_every_phase(app, upstream, phase):
    t = tag()
    kw = {"tokens flowing": {"tokens": 1000, "interval": 0.02}, "before headers": {"header_delay": 30},
          "silence": {"tokens": 10, "silence_after": 2, "silence": 30}}[phase]
    told = app.output().count("stopped: client_disconnect")
    s = SSE(app.port, scenario(tag=t, **kw), path="/stream", wait_for_headers=False)
    if phase == "before headers":
        poll(lambda: upstream.record(t), lambda r: r.get("tag"), 5)  # the provider has the request
        time.sleep(0.1)
    else:
        s.read_until("delta", 2)
        time.sleep(0.1)
    closed = s.close()
    rec = upstream.wait_closed(t, timeout=3)
    assert rec.get("closed_at") is not None, f"{app.name}: the provider was never told ({phase})"
    assert rec["closed_at"] - closed < 0.1, (app.name, phase, rec["closed_at"] - closed)
    # The app's own `except Cancelled` ran, in this phase too.
    out = poll(app.output, lambda out: out.count("stopped: client_disconnect") > told, 2)
    assert out.count("stopped: client_disconnect") == told + 1, (app.name, phase)


def test_keepalives_fill_a_silence(app, upstream):
    s = SSE(app.port, scenario(tokens=4, silence_after=2, silence=2), path="/stream")
    events = s.read_all()
    kinds = [kind for kind, _, _ in events]
    assert kinds.count(":") >= 2 and kinds[-1] == "delta"
    assert kinds.index(":") > kinds.index("delta")  # in the silence, not before the first piece


def test_200_streams_closed_at_once_under_gthread_leave_nothing_behind(upstream, tmp_path):
    app = CopiedApp(tmp_path, "gthread", upstream, args=["--threads", "210"])
    try:
        worker = int(poll(lambda: _children(app.proc.pid), bool, 5)[0])
        s = SSE(app.port, scenario(tokens=2), path="/stream")  # warm: the pool and the watcher thread
        s.read_all()
        threads, fds = _threads(worker), open_fds(worker)
        tags = [tag() for _ in range(200)]
        streams = [SSE(app.port, scenario(tag=t, tokens=10, silence_after=1, silence=60), path="/stream",
                       wait_for_headers=False) for t in tags]
        for stream in streams:
            stream.read_until("delta")
        during = _threads(worker)
        assert during >= threads + 200  # a producer thread per stream (and a handler thread)
        for stream in streams:
            stream.close()
        records = [upstream.wait_closed(t, timeout=5) for t in tags]
        assert all(r.get("closed_at") for r in records), sum(1 for r in records if not r.get("closed_at"))
        # Every producer thread ended; gunicorn keeps its own handler threads pooled (--threads 210).
        after = poll(lambda: _threads(worker), lambda n: n <= during - 200, 5)
        assert after <= during - 200 and after <= threads + 210, (threads, during, after)
        assert poll(lambda: open_fds(worker), lambda n: n <= fds, 5) <= fds
    finally:
        app.stop()


def _children(pid):
    return [p for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == pid]


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def _threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def test_gunicorns_sync_worker_gets_a_clear_error(upstream, tmp_path):
    app = CopiedApp(tmp_path, "sync", upstream, args=["-m", "gunicorn", "--no-control-socket", "-k", "sync", "myapp:app"])
    try:
        s = SSE(app.port, scenario(tag=(t := tag())), path="/stream")
        assert s.status == 500
        out = poll(app.output, lambda o: "UnsupportedServer" in o, 3)
        assert "sync worker" in out and "-k gevent" in out and "-k gthread" in out and "30 s" in out
        assert upstream.record(t) == {}
    finally:
        app.stop()


@pytest.mark.parametrize("server", ["gthread", "flask run"])
def test_stop_while_connecting_abandons_the_connect_under_threads(upstream, tmp_path, server):
    """An upstream whose accept queue is full leaves connect() hanging; Stop must wake the thread in it."""
    from test_relay import connections_to
    blackhole, filler = full_accept_queue()
    port = blackhole.getsockname()[1]
    app = CopiedApp(tmp_path, server, upstream, UPSTREAM_URL=f"http://127.0.0.1:{port}/v1/chat/completions")
    try:
        pid = int(poll(lambda: _children(app.proc.pid), bool, 5)[0]) if server == "gthread" else app.proc.pid
        s = SSE(app.port, scenario(), path="/stream", wait_for_headers=False)
        assert poll(lambda: connections_to(port, pid), bool, 3), "the app should be stuck connecting"
        s.close()
        assert poll(lambda: connections_to(port, pid), lambda c: not c, 1) == [], "the connect was not abandoned"
        assert "stopped: client_disconnect" in poll(app.output, lambda o: "stopped: client_disconnect" in o, 2)
    finally:
        app.stop()
        for f in filler:
            f.close()
        blackhole.close()
