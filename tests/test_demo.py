"""The embedded demo model: its OpenAI wire format, its directives and its meter, over real gunicorn."""
import time

from harness import SSE, get_json, texts


def chat(server, prompt):
    events = SSE(server.port, {"messages": [{"role": "user", "content": prompt}]}).read_all()
    return events, server.wait_finished(events[0][1]["id"])


def test_the_demo_speaks_openai_streaming_with_a_request_id_and_a_meter(demo_server):
    s = SSE(demo_server.port, {"model": "demo", "messages": [{"role": "user", "content": "/words 3"}],
                               "stream": True}, path="/demo/v1/chat/completions")
    assert s.headers["x-request-id"].startswith("demo-")
    events = s.read_all()
    chunks = [e[1] for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]).split() == \
        ["Most", "stop", "buttons"]
    assert chunks[-1]["usage"]["completion_tokens"] == 3 and events[-1][1] == "[DONE]"
    meter = get_json(f"{demo_server.url}/demo/v1/requests/{s.headers['x-request-id']}")
    assert meter["status"] == "complete" and meter["tokens_generated"] == 3
    assert meter["client_disconnected_at"] is None and meter["tokens_after_disconnect"] is None


def test_readable_english_and_a_long_answer(demo_server):
    events, gen = chat(demo_server, "/long /rate 2000")
    words = texts(events).split()
    assert len(words) > 350 and "Stop," in words and gen["status"] == "complete"


def test_pause_before_the_first_token_and_stall_mid_stream_show_keepalives(demo_server):
    """KEEPALIVE_SECONDS=0.5 on this server: 1.2 s of silence carries two keepalive comments."""
    events, _ = chat(demo_server, "/pause 1.2 /words 3")
    kinds = [e[0] for e in events]
    assert kinds[:4] == ["start", ":", ":", "delta"]
    events, _ = chat(demo_server, "/stall 1.2 /words 8 /rate 50")
    kinds = [e[0] for e in events]
    assert kinds[1:6] == ["delta"] * 5 and kinds[6:8] == [":", ":"] and kinds[-1] == "done"


def test_fail_ends_with_an_error_event(demo_server):
    events, gen = chat(demo_server, "/fail /rate 100")
    assert texts(events).split() == ["Most", "stop", "buttons", "only", "hide"]
    assert events[-1][0] == "error" and "simulated failure" in events[-1][1]["message"]
    assert gen["status"] == "error"


def test_echo_answers_with_the_text_itself(demo_server):
    events, _ = chat(demo_server, "/echo  two  spaces\nand a line")
    assert texts(events) == " two  spaces\nand a line"  # one space separates the directive


def test_the_meter_counts_tokens_after_its_client_left(demo_server):
    s = SSE(demo_server.port, {"messages": [{"role": "user", "content": "/words 500 /rate 50"}]})
    events = s.read_until("delta", 5)
    s.close()
    gen = demo_server.wait_finished(events[0][1]["id"])
    deadline = time.monotonic() + 2
    while (meter := get_json(f"{demo_server.url}/demo/v1/requests/{gen['upstream_request_id']}"))["status"] == "generating":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert meter["status"] == "disconnected" and meter["client_disconnected_at"]
    assert 5 <= meter["tokens_generated"] < 500 and meter["tokens_after_disconnect"] <= 1
