"""Running it for many users: access to the log, the capacity guard, usage for stopped answers, metrics."""
import json
import re
import resource
import shutil
import socket
import sqlite3
import subprocess
import time
import urllib.request
import uuid

import pytest

import harness
from conftest import require_binary
from harness import ADMIN_TOKEN, SSE, Server, get_json, scenario


def tag():
    return uuid.uuid4().hex[:12]


def request(url, method="GET", body=None, headers=None):
    """Return (status, headers, parsed JSON or text) of one request."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, head, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        status, head, raw = exc.code, exc.headers, exc.read()
    try:
        return status, head, json.loads(raw)
    except ValueError:
        return status, head, raw.decode()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


# -- access to the log ---------------------------------------------------------------------

def test_listing_the_log_needs_the_admin_token(relay):
    gen_id = SSE(relay.port, scenario(tokens=2)).read_all()[0][1]["id"]
    url = relay.url + "/api/generations?limit=5"
    for headers in ({}, bearer("wrong"), bearer(ADMIN_TOKEN + "x"), {"Authorization": ADMIN_TOKEN}):
        status, head, body = request(url, headers=headers)
        assert status == 401 and body["error"]["type"] == "unauthorized", headers
        assert head["WWW-Authenticate"].startswith("Bearer")
    status, _, body = request(url, headers=bearer(ADMIN_TOKEN))
    assert status == 200 and gen_id in [g["id"] for g in body["generations"]]
    # One record stays readable by its id alone: the id is the capability.
    assert get_json(f"{relay.url}/api/generations/{gen_id}")["id"] == gen_id


def test_without_admin_token_the_list_is_forbidden_and_says_which_setting(upstream, tmp_path):
    server = Server(tmp_path, ADMIN_TOKEN="", LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m")
    try:
        for path in ("/api/generations", "/metrics"):
            status, _, body = request(server.url + path, headers=bearer("anything"))
            assert status == 403 and body["error"]["type"] == "forbidden" and "ADMIN_TOKEN" in body["error"]["message"]
    finally:
        server.stop()


def test_the_demo_model_is_served_only_when_it_is_the_provider(relay, demo_server):
    status, _, body = request(relay.url + "/demo/v1/chat/completions", "POST", {"messages": []})
    assert status == 404 and body["error"]["type"] == "not_found"
    assert request(relay.url + "/demo/v1/requests/x")[0] == 404
    assert request(demo_server.url + "/demo/v1/requests/x")[2]["error"]["type"] == "not_found"  # served there


def test_log_retention_deletes_old_rows_text_included(upstream, tmp_path):
    path = tmp_path / "old.db"
    first = Server(tmp_path, GENERATIONS_DB=str(path), LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1",
                   LLM_MODEL="m")
    kept = SSE(first.port, scenario(tokens=2)).read_all()[0][1]["id"]
    old = SSE(first.port, scenario(tokens=2)).read_all()[0][1]["id"]
    first.wait_finished(old)
    first.stop()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE generations SET started_at = '2020-01-01T00:00:00.000Z' WHERE id = ?", (old,))
    conn.commit()
    conn.close()
    server = Server(tmp_path, GENERATIONS_DB=str(path), LOG_RETENTION_DAYS=30, LLM_PROVIDER="openai",
                    LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m")
    try:
        gone = harness.poll(lambda: server.generation(old), lambda r: r.get("error"), 5)
        assert gone["error"]["type"] == "not_found"
        assert server.generation(kept)["status"] == "complete"
        # The row goes before its log line is written.
        assert '"retention": "deleted", "rows": 1' in harness.poll(server.output, lambda out: '"rows": 1' in out, 5)
    finally:
        server.stop()


# -- the capacity guard --------------------------------------------------------------------

def streaming_rows(server):
    return [g for g in server.list("limit=1000")["generations"] if g["status"] == "streaming"]


def test_a_full_worker_answers_503_at_once(upstream, tmp_path):
    server = Server(tmp_path, MAX_STREAMS_PER_WORKER=2, LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1",
                    LLM_MODEL="m")
    try:
        held = [SSE(server.port, scenario(tokens=10, silence_after=1, silence=30)) for _ in range(2)]
        for s in held:
            s.read_until("delta")
        began = time.monotonic()
        status, head, body = request(server.url + "/api/chat", "POST", scenario(tag=(t := tag())))
        assert status == 503 and body["error"]["type"] == "server_busy" and head["Retry-After"] == "5"
        assert time.monotonic() - began < 1
        assert upstream.record(t) == {}  # before any streaming: the provider never heard of it
        assert len(streaming_rows(server)) == 2  # the refused chat left no row
        held[0].close()
        harness.poll(lambda: streaming_rows(server), lambda rows: len(rows) == 1, 5)
        assert SSE(server.port, scenario(tokens=2)).read_all()[-1][0] == "done"  # room again
        held[1].close()
        assert harness.poll(lambda: streaming_rows(server), lambda rows: not rows, 5) == []
    finally:
        server.stop()


@pytest.fixture(scope="module")
def limited(upstream, tmp_path_factory):
    """Two workers, two streams per client, behind one trusted proxy."""
    server = Server(tmp_path_factory.mktemp("limited"), workers=2, MAX_STREAMS_PER_CLIENT=2, TRUSTED_PROXIES=1,
                    LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m")
    proxy = harness.Nginx(require_binary("nginx"), tmp_path_factory.mktemp("nginx-limited"), server)
    yield server, proxy
    proxy.stop()
    server.stop()


def test_a_client_past_its_stream_limit_gets_429_across_workers(limited, upstream):
    server, proxy = limited
    held = []
    for _ in range(2):
        held.append(SSE(proxy.port, scenario(tokens=10, silence_after=1, silence=30)))
        held[-1].read_until("delta")
    assert len({server.generation(s_id)["worker_pid"] for s_id in streaming_ids(server)}) >= 1
    t = tag()
    # A client that forges X-Forwarded-For still counts as itself: nginx appends the real address.
    spoof = {"X-Forwarded-For": "203.0.113.9"}
    refused = SSE(proxy.port, scenario(tag=t), headers=spoof, wait_for_headers=True)
    assert refused.status == 429 and refused.headers["retry-after"] == "5"
    assert json.loads(refused.sock.recv(65536) if not refused.buf else refused.buf)["error"]["type"] == "too_many_streams"
    assert upstream.record(t) == {}
    assert len(streaming_ids(server)) == 2
    held[0].close()
    harness.poll(lambda: streaming_ids(server), lambda ids: len(ids) == 1, 5)
    assert SSE(proxy.port, scenario(tokens=2), headers=spoof).read_all()[-1][0] == "done"  # under the limit again
    held[1].close()
    assert harness.poll(lambda: streaming_ids(server), lambda ids: not ids, 5) == []


def streaming_ids(server):
    return [g["id"] for g in streaming_rows(server)]


# -- bad input -----------------------------------------------------------------------------

def test_a_deeply_nested_body_is_a_clear_400(relay):
    for body in (b"[" * 100_000, b"{\"a\":" * 100_000, b"[" * 100_000 + b"]" * 100_000):
        s = SSE(relay.port, None, raw_body=body)
        assert s.status == 400
    status, _, answer = request(relay.url + "/api/chat", "POST", None)
    assert "Traceback" not in relay.output() and "RecursionError" not in relay.output()


# -- usage for stopped answers -------------------------------------------------------------

@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_stopped_answer_keeps_usage_null_and_estimates_what_is_known(upstream, tmp_path, provider):
    base = upstream.url + ("/v1" if provider == "openai" else "")
    server = Server(tmp_path, LLM_PROVIDER=provider, LLM_BASE_URL=base, LLM_MODEL="m", LLM_API_KEY="k")
    try:
        s = SSE(server.port, scenario(tokens=100, interval=0.02))
        events = s.read_until("delta", 5)
        s.close()
        gen = server.wait_finished(events[0][1]["id"])
        assert gen["status"] == "cancelled" and gen["usage"] is None
        estimate = gen["usage_estimate"]
        assert estimate["output_tokens"] == gen["chunks"] >= 5 and "lower bound" in estimate["output_tokens_method"]
        if provider == "anthropic":
            assert estimate["input_tokens"] == 11 and "message_start" in estimate["input_tokens_source"]
        else:
            assert "input_tokens" not in estimate
        line = [json.loads(l.split(" relay ", 1)[1]) for l in server.output().splitlines() if f'"generation": "{gen["id"]}"' in l][-1]
        assert line["usage_estimate"] == estimate
        done = SSE(server.port, scenario(tokens=3)).read_all()
        assert server.generation(done[0][1]["id"])["usage_estimate"] is None  # the provider reported usage
    finally:
        server.stop()


# -- Prometheus metrics --------------------------------------------------------------------

def samples(text):
    """Parse Prometheus text into {(name, frozenset(labels)): value}."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$', line)
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def value(metrics, name, **labels):
    return sum(v for (n, ls), v in metrics.items() if n == name and set(labels.items()) <= ls)


def test_metrics_add_up_every_workers_traffic_and_pass_promtool(upstream, tmp_path):
    server = Server(tmp_path, workers=2, METRICS_TOKEN="scrape-token", KEEPALIVE_SECONDS=0.5, LLM_PROVIDER="openai",
                    LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m")
    try:
        for _ in range(4):  # 4 complete, 3 pieces each: usage reported by the provider
            assert SSE(server.port, scenario(tokens=3)).read_all()[-1][0] == "done"
        cut = []
        for _ in range(2):  # 2 stopped by their client after 2 pieces: usage estimated
            s = SSE(server.port, scenario(tokens=100, interval=0.05))
            cut.append(s.read_until("delta", 2)[0][1]["id"])
            s.close()
        s = SSE(server.port, scenario(tokens=100, interval=0.05))  # 1 stopped by a stop request
        stopped = s.read_until("delta", 2)[0][1]["id"]
        request(f"{server.url}/api/generations/{stopped}/stop", "POST")
        s.read_all()
        assert SSE(server.port, scenario(tokens=2, end="error")).read_all()[-1][0] == "error"  # 1 provider error
        for gen_id in [*cut, stopped]:
            server.wait_finished(gen_id)
        time.sleep(0.3)  # the metrics of a generation are counted when its row is written
        assert request(server.url + "/metrics")[0] == 401
        assert request(server.url + "/metrics", headers=bearer("wrong"))[0] == 401
        assert request(server.url + "/metrics", headers=bearer(ADMIN_TOKEN))[0] == 200
        status, head, text = request(server.url + "/metrics", headers=bearer("scrape-token"))
        assert status == 200 and head["Content-Type"].startswith("text/plain")
        m = samples(text)
        assert value(m, "relay_generations_total", status="complete") == 4
        assert value(m, "relay_generations_total", status="cancelled", cancel_reason="client_disconnect") == 2
        assert value(m, "relay_generations_total", status="cancelled", cancel_reason="stop_request") == 1
        assert value(m, "relay_generations_total", status="error") == 1
        assert value(m, "relay_provider_errors_total", type="server_error") == 1
        pieces = sum(server.generation(i)["chunks"] for i in [*cut, stopped])
        assert value(m, "relay_text_pieces_total") == 4 * 3 + pieces + 2
        assert value(m, "relay_output_tokens_total", source="provider") == 4 * 3
        assert value(m, "relay_output_tokens_total", source="estimate") == pieces + 2
        assert value(m, "relay_stop_to_upstream_close_seconds_count", signal="disconnect") == 2
        assert value(m, "relay_stop_to_upstream_close_seconds_count", signal="stop_request") == 1
        assert value(m, "relay_time_to_first_token_seconds_count") == 8
        assert value(m, "relay_generation_duration_seconds_count") == 8
        assert value(m, "relay_open_streams") == 0
        workers = {server.generation(i)["worker_pid"] for i in [*cut, stopped]}
        # Neither ids, prompts nor addresses in labels.
        assert not any(gen_id in text for gen_id in [*cut, stopped]) and "127.0.0.1" not in text
        promtool = require_binary("promtool")
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        assert workers  # (which workers served is the kernel's choice; the sums above hold either way)
    finally:
        server.stop()


def test_open_streams_gauge_counts_live_streams_across_workers(upstream, tmp_path):
    server = Server(tmp_path, workers=2, LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m")
    try:
        held = [SSE(server.port, scenario(tokens=10, silence_after=1, silence=30)) for _ in range(3)]
        for s in held:
            s.read_until("delta")
        scrape = lambda: samples(request(server.url + "/metrics", headers=bearer(ADMIN_TOKEN))[2])  # noqa: E731
        assert value(scrape(), "relay_open_streams") == 3
        for s in held:
            s.close()
        assert value(harness.poll(scrape, lambda m: value(m, "relay_open_streams") == 0, 5), "relay_open_streams") == 0
    finally:
        server.stop()


def test_the_worker_gets_the_open_files_its_connections_need_or_a_warning(upstream, tmp_path):
    """Each stream is two sockets in its worker: the soft file limit is raised to the hard one, and a short one is named."""
    def limits():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096))

    env = dict(LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m", preexec_fn=limits)
    enough = Server(tmp_path, WORKER_CONNECTIONS=1500, **env)  # needs ~3,100: over the soft limit, under the hard
    short = Server(tmp_path, WORKER_CONNECTIONS=3000, **env)  # needs ~6,100: over both
    try:
        for server in (enough, short):
            with open(f"/proc/{server.workers()[0]}/limits") as f:
                line = next(line for line in f if line.startswith("Max open files"))
            assert line.split()[3:5] == ["4096", "4096"]
        assert "open files" not in enough.output()
        assert ("WORKER_CONNECTIONS=3000 needs about 6100 open files per worker, the limit is 4096: streams past ~1998"
                " per worker will fail to connect") in short.output()
    finally:
        enough.stop()
        short.stop()
