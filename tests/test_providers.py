"""Each provider adapter against its real wire format, and every way an upstream misbehaves."""
import json
import socket
import time
import uuid

import pytest

from harness import SSE, Server, scenario, texts

KEY = "sk-ant-TOPSECRET-0123"
PROVIDERS = {
    "openai": {"LLM_BASE_URL": "{up}/v1", "LLM_MODEL": "gpt-test"},
    "anthropic": {"LLM_BASE_URL": "{up}", "LLM_MODEL": "claude-test"},
    "ollama": {"LLM_BASE_URL": "{up}", "LLM_MODEL": "llama3"},
}
USAGE = {
    "openai": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    "anthropic": {"input_tokens": 11, "output_tokens": 3},
    "ollama": {"prompt_tokens": 9, "completion_tokens": 3},
}
FINISH = {"openai": "stop", "anthropic": "end_turn", "ollama": "stop"}


@pytest.fixture(scope="module", params=list(PROVIDERS))
def provider(request, upstream, tmp_path_factory):
    name = request.param
    env = {k: v.format(up=upstream.url) for k, v in PROVIDERS[name].items()}
    server = Server(tmp_path_factory.mktemp(name), LLM_PROVIDER=name, LLM_API_KEY=KEY, KEEPALIVE_SECONDS=0.5,
                    UPSTREAM_CONNECT_TIMEOUT=1, UPSTREAM_READ_TIMEOUT=1.5, **env)
    server.name = name
    yield server
    server.stop()


def tag():
    return uuid.uuid4().hex[:12]


def run(server, **kw):
    """Stream one chat; return (events without comments, its generation record)."""
    s = SSE(server.port, scenario(**kw))
    events = [e for e in s.read_all(timeout=15) if e[0] != ":"]
    assert events[0][0] == "start"
    return events, server.wait_finished(events[0][1]["id"])


def assert_error(events, gen, error_type):
    assert events[-1][0] == "error", events
    err = events[-1][1]
    assert err["status"] == "error" and err["type"] == error_type, err
    assert err["message"] and KEY not in json.dumps(err)
    assert gen["status"] == "error" and error_type in gen["error"] and KEY not in gen["error"]
    return err


def test_text_usage_and_request_shape(provider, upstream):
    t = tag()
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": json.dumps({"tag": t, "tokens": 3})}],
            "max_tokens": 50}
    s = SSE(provider.port, body)
    events = [e for e in s.read_all() if e[0] != ":"]
    assert [e[0] for e in events] == ["start", "delta", "delta", "delta", "done"]
    assert texts(events) == "tok0 tok1 tok2 "
    assert events[-1][1] == {"status": "complete", "finish_reason": FINISH[provider.name], "usage": USAGE[provider.name]}
    gen = provider.wait_finished(events[0][1]["id"])
    assert gen["status"] == "complete" and gen["text"] == "tok0 tok1 tok2 " and gen["usage"] == USAGE[provider.name]
    assert gen["upstream_request_id"] == f"up-{t}" and gen["provider"] == provider.name
    sent = upstream.record(t)
    req, headers = sent["request_body"], sent["request_headers"]
    assert req["stream"] is True
    if provider.name == "anthropic":
        assert sent["path"] == "/v1/messages"
        assert headers["x-api-key"] == KEY and headers["anthropic-version"] == "2023-06-01"
        assert req["system"] == "Be brief." and [m["role"] for m in req["messages"]] == ["user"]
        assert req["max_tokens"] == 50 and req["model"] == "claude-test"
    elif provider.name == "ollama":
        assert sent["path"] == "/api/chat" and req["options"] == {"num_predict": 50}
        assert [m["role"] for m in req["messages"]] == ["system", "user"]
    else:
        assert sent["path"] == "/v1/chat/completions" and req["max_tokens"] == 50
        assert headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("phase", ["before_headers", "streaming", "silence"])
def test_cancel_in_every_phase_closes_the_upstream(provider, upstream, phase):
    t = tag()
    kw = {"before_headers": {"header_delay": 30}, "streaming": {"tokens": 1000, "interval": 0.02},
          "silence": {"tokens": 10, "silence_after": 2, "silence": 30}}[phase]
    # This server's read timeout is 1.5 s, so stop well before it.
    s = SSE(provider.port, scenario(tag=t, **kw))
    events = s.read_until("start") if phase == "before_headers" else s.read_until("delta", 2)
    time.sleep(0.2)
    closed = s.close()
    rec = upstream.wait_closed(t)
    assert rec["closed_at"] is not None and rec["closed_at"] - closed < 0.5
    gen = provider.wait_finished(events[0][1]["id"])
    assert gen["status"] == "cancelled" and gen["cancel_reason"] == "client_disconnect"


ERROR_BODIES = {
    "openai": lambda status, msg: {"error": {"message": msg, "type": "invalid_request_error", "code": None}},
    "anthropic": lambda status, msg: {"type": "error", "error": {"type": "api_error", "message": msg}},
    "ollama": lambda status, msg: {"error": msg},
}


@pytest.mark.parametrize("status, error_type", [
    (400, "invalid_request"), (401, "authentication_error"), (403, "permission_error"), (404, "not_found"),
    (429, "rate_limited"), (500, "upstream_server_error"), (503, "upstream_overloaded"), (529, "upstream_overloaded"),
])
def test_http_errors_before_the_stream(provider, upstream, status, error_type):
    t = tag()
    message = f"provider says {status}; your key {KEY} is shown here"
    headers = {"Retry-After": "7"} if status == 429 else {}
    events, gen = run(provider, tag=t, status=status, headers=headers,
                      error_body=json.dumps(ERROR_BODIES[provider.name](status, message)))
    err = assert_error(events, gen, error_type)
    assert err["upstream_status"] == status and f"provider says {status}" in err["message"]
    assert "[redacted]" in err["message"]
    assert err.get("retry_after") == ("7" if status == 429 else None)
    assert upstream.wait_closed(t)["closed_at"] is not None


def test_connection_refused(provider, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        server = Server(tmp_path, LLM_PROVIDER=provider.name, LLM_MODEL="m", LLM_API_KEY=KEY,
                        LLM_BASE_URL=f"http://127.0.0.1:{port}")
        try:
            events, gen = run(server)
            assert_error(events, gen, "upstream_unreachable")
        finally:
            server.stop()


def test_connect_timeout(provider, tmp_path):
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    filler = [socket.socket() for _ in range(2)]
    for f in filler:  # a full accept queue: later SYNs are dropped and connect() hangs
        f.setblocking(False)
        f.connect_ex(blackhole.getsockname())
    server = Server(tmp_path, LLM_PROVIDER=provider.name, LLM_MODEL="m", LLM_API_KEY=KEY, UPSTREAM_CONNECT_TIMEOUT=0.5,
                    LLM_BASE_URL=f"http://127.0.0.1:{blackhole.getsockname()[1]}")
    try:
        began = time.monotonic()
        events, gen = run(server)
        assert "connect" in assert_error(events, gen, "upstream_timeout")["message"]
        assert time.monotonic() - began < 5
    finally:
        server.stop()
        for f in filler:
            f.close()
        blackhole.close()


@pytest.mark.parametrize("kw", [{"header_delay": 30}, {"tokens": 5, "silence_after": 2, "silence": 30}],
                         ids=["never_answers", "silent_mid_stream"])
def test_silence_longer_than_the_read_timeout(provider, upstream, kw):
    t = tag()
    began = time.monotonic()
    events, gen = run(provider, tag=t, **kw)
    err = assert_error(events, gen, "upstream_timeout")
    assert "UPSTREAM_READ_TIMEOUT" in err["message"]
    assert 1.4 < time.monotonic() - began < 6
    assert upstream.wait_closed(t)["closed_at"] is not None


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_abrupt_close_mid_stream(provider, upstream, framing):
    events, gen = run(provider, tag=tag(), tokens=3, end="abrupt", framing=framing)
    assert texts(events) == "tok0 tok1 tok2 "
    assert_error(events, gen, "upstream_disconnected" if framing == "chunked" else "upstream_ended_early")
    assert gen["text"] == "tok0 tok1 tok2 "


def test_truncated_last_event(provider, upstream):
    events, gen = run(provider, tag=tag(), tokens=2, end="truncate", framing="close")
    assert texts(events) == "tok0 tok1 " and "GARB" not in json.dumps([e[1] for e in events])
    assert_error(events, gen, "upstream_disconnected")


def test_malformed_json(provider, upstream):
    events, gen = run(provider, tag=tag(), tokens=2, end="malformed", framing="close")
    assert texts(events) == "tok0 tok1 "
    assert_error(events, gen, "upstream_bad_response")


def test_error_sent_mid_stream(provider, upstream):
    events, gen = run(provider, tag=tag(), tokens=2, end="error")
    assert texts(events) == "tok0 tok1 "
    err = assert_error(events, gen, {"openai": "server_error", "anthropic": "overloaded_error",
                                     "ollama": "upstream_error"}[provider.name])
    assert "mid-stream" in err["message"]


def test_unknown_event_types_are_ignored(provider, upstream):
    events, gen = run(provider, tag=tag(), tokens=2, unknown_event=True)
    assert texts(events) == "tok0 tok1 " and events[-1][0] == "done" and gen["status"] == "complete"


def test_multibyte_characters_split_across_network_chunks(provider, upstream):
    events, gen = run(provider, tag=tag(), tokens=3, text="né€😀{i}", piece_size=5, interval=0)
    assert texts(events) == "né€😀0né€😀1né€😀2" and gen["status"] == "complete"


def test_a_very_large_event(provider, upstream):
    big = "x" * 1_000_000
    events, gen = run(provider, tag=tag(), tokens=2, text="{i}", pad=len(big))
    assert texts(events) == big + "0" + big + "1" and gen["status"] == "complete"


def test_openai_stream_without_done_but_with_finish_reason_is_complete(relay, upstream):
    events, gen = run(relay, tag=tag(), tokens=2, end="no_done")
    assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == "stop" and gen["status"] == "complete"
