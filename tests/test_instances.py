"""Two relay instances sharing nothing but a real Postgres, behind one nginx upstream listing both."""
import time
import uuid

import pytest

import harness
from conftest import require_binary
from harness import SSE, Server, get_json, poll, post, scenario


def tag():
    return uuid.uuid4().hex[:12]




def instance(name, tmp_path_factory, postgres, upstream):
    return Server(tmp_path_factory.mktemp(f"instance-{name}"), workers=2, DATABASE_URL=postgres.url,
                  INSTANCE_ID=name, LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m",
                  KEEPALIVE_SECONDS=0.5)


@pytest.fixture(scope="module")
def pair(postgres, upstream, tmp_path_factory):
    a = instance("a", tmp_path_factory, postgres, upstream)
    b = instance("b", tmp_path_factory, postgres, upstream)
    yield {"a": a, "b": b}
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def proxy(pair, tmp_path_factory):
    nginx = harness.Nginx(require_binary("nginx"), tmp_path_factory.mktemp("nginx-pair"), [pair["a"], pair["b"]])
    yield nginx
    nginx.stop()


def test_a_stop_sent_to_either_instance_stops_a_stream_the_other_holds(pair, proxy, upstream):
    holders, delays = set(), []
    for _ in range(16):
        t = tag()
        s = SSE(proxy.port, scenario(tag=t, tokens=1000, interval=0.02))
        gen_id = s.read_until("delta", 2)[0][1]["id"]
        holder = pair["a"].generation(gen_id)["instance_id"]
        holders.add(holder)
        other = pair["b" if holder == "a" else "a"]
        sent = time.monotonic()
        status, body = post(f"{other.url}/api/generations/{gen_id}/stop")
        assert status == 200 and body["status"] == "cancelled" and body["cancel_reason"] == "stop_request"
        rec = upstream.wait_closed(t)
        assert rec["closed_at"] is not None and rec["closed_at"] - sent < 0.5
        delays.append(rec["closed_at"] - sent)
        events = [e for e in s.read_all() if e[0] != ":"]
        assert events[-1][0] == "cancelled"
        if holders == {"a", "b"} and len(delays) >= 6:
            break
    assert holders == {"a", "b"}, "nginx sent every stream to one instance"
    # NOTIFY, not the owner's re-check every 0.25 s, carried these: milliseconds.
    assert sorted(delays)[len(delays) // 2] < 0.05, delays


def test_the_log_reads_the_same_from_both_instances(pair, proxy):
    ids = []
    for _ in range(4):
        events = SSE(proxy.port, scenario(tokens=3)).read_all()
        ids.append(events[0][1]["id"])
        # Read-your-writes across machines: right after `done`, the other instance agrees.
        for server in pair.values():
            assert server.generation(ids[-1])["status"] == "complete"
    for gen_id in ids:
        assert pair["a"].generation(gen_id) == pair["b"].generation(gen_id)
    assert {r["instance_id"] for r in (pair["a"].generation(i) for i in ids)} <= {"a", "b"}
    lists = [server.list("limit=50")["generations"] for server in pair.values()]
    assert lists[0] == lists[1] and {g["id"] for g in lists[0]} >= set(ids)


def test_a_lost_notify_is_covered_by_the_owners_own_recheck(pair, postgres, upstream):
    t = tag()
    s = SSE(pair["a"].port, scenario(tag=t, tokens=1000, interval=0.02))
    gen_id = s.read_until("delta", 2)[0][1]["id"]
    # Cut every listener's connection: a NOTIFY now reaches nobody (they reconnect after 1 s).
    killed = harness_pg(postgres, "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity"
                                  " WHERE query LIKE 'LISTEN%'")[0]["n"]
    assert killed >= 1
    sent = time.monotonic()
    assert post(f"{pair['b'].url}/api/generations/{gen_id}/stop")[1]["status"] == "cancelled"
    rec = upstream.wait_closed(t)
    assert rec["closed_at"] is not None and rec["closed_at"] - sent < 0.9
    s.close()


def harness_pg(postgres, sql):
    import sys
    sys.path.insert(0, harness.ROOT)
    import db
    return db.run(postgres.url, sql, pooled=False)[0]


def test_restarting_one_instance_leaves_the_others_streams_alone(pair, upstream):
    t = tag()
    s = SSE(pair["b"].port, scenario(tag=t, tokens=600, interval=0.02))  # 12 s on instance b
    gen_id = s.read_until("delta", 2)[0][1]["id"]
    pair["a"].restart()  # on_starting closes rows left streaming: only instance a's
    assert pair["b"].generation(gen_id)["status"] == "streaming"
    events = [e for e in s.read_all() if e[0] != ":"]
    assert events[-1][0] == "done" and len([e for e in events if e[0] == "delta"]) == 600 - 2
    assert pair["a"].generation(gen_id)["status"] == "complete"


def test_postgres_down_refuses_new_chats_cleanly_and_loses_no_row(pair, postgres, upstream):
    a = pair["a"]
    t_done, t_cut = tag(), tag()
    finishing = SSE(a.port, scenario(tag=t_done, tokens=100, interval=0.02))  # ends while Postgres is down
    cut = SSE(a.port, scenario(tag=t_cut, tokens=1000, interval=0.02))  # closed by its client meanwhile
    done_id = finishing.read_until("delta", 2)[0][1]["id"]
    cut_id = cut.read_until("delta", 2)[0][1]["id"]
    postgres.stop()
    try:
        began = time.monotonic()
        status, body = post(f"{a.url}/api/chat", scenario(tokens=3))
        assert status == 503 and body["error"]["type"] == "log_unavailable" and time.monotonic() - began < 5
        closed = cut.close()  # a Stop by disconnect still works with the store gone
        rec = upstream.wait_closed(t_cut)
        assert rec["closed_at"] is not None and rec["closed_at"] - closed < 0.5
        events = [e for e in finishing.read_all() if e[0] != ":"]
        assert events[-1][0] == "done"  # the stream went on
        assert get_json(f"{a.url}/api/generations/{done_id}")["error"]["type"] == "log_unavailable"
    finally:
        postgres.start()
    for gen_id, status in ((done_id, "complete"), (cut_id, "cancelled")):
        gen = poll(lambda: a.generation(gen_id), lambda g: g.get("status") == status, 10)
        assert gen["status"] == status, gen
    assert a.generation(done_id)["chunks"] == 100
    assert "final row written after the store came back" in a.output()
    assert "Traceback" not in a.output()
