"""Stop in real Chromium through a proxy that does not pass aborts on (nginx with proxy_ignore_client_abort on).

In a silence nginx never writes to the browser, so with this setting it never learns the
browser left: only the page's stop request (a keepalive fetch, or a beacon on pagehide)
reaches the worker. The demo model's meter says whether the model stopped.
"""
import time

import pytest

import harness
from conftest import require_binary
from harness import Server, get_json, poll
from test_page import browser, send, wait_tokens  # noqa: F401 - the module's Chromium

OFF, ON = "proxy_ignore_client_abort off;", "proxy_ignore_client_abort on;"


@pytest.fixture(scope="module")
def deaf_proxy(tmp_path_factory):
    # A keepalive longer than the test: nginx gets no write that could fail in the silence.
    server = Server(tmp_path_factory.mktemp("deaf"), workers=2, KEEPALIVE_SECONDS=60, DEMO_TOKENS_PER_SECOND=50)
    proxy = harness.Nginx(require_binary("nginx"), tmp_path_factory.mktemp("nginx-deaf"), server, swaps=[(OFF, ON)])
    yield server, proxy
    proxy.stop()
    server.stop()


def newest(server):
    return server.list("limit=1")["generations"][0]


def model_stopped(server, gen):
    """Return the demo meter of a generation once the model has stopped, or after 2 s."""
    def meter():
        upstream_id = server.generation(gen["id"]).get("upstream_request_id") or ""
        return get_json(f"{server.url}/demo/v1/requests/{upstream_id}") if upstream_id else {}
    return poll(meter, lambda m: m.get("status") == "disconnected", 2)


@pytest.mark.parametrize("how", ["stop button", "tab closed"])
def test_stop_through_a_proxy_that_swallows_aborts_still_stops_the_model(browser, deaf_proxy, how):  # noqa: F811
    server, proxy = deaf_proxy
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{proxy.port}/")
    send(page, "/words 60 /stall 30")  # five tokens, then 30 s of silence
    wait_tokens(page, 5)
    time.sleep(0.2)
    gen = newest(server)
    assert gen["status"] == "streaming"
    if how == "stop button":
        page.get_by_role("button", name="Stop generating").click()
        page.locator('article.assistant[data-status="stopped"]').wait_for(timeout=2000)
    else:
        page.close()
    gen = server.wait_finished(gen["id"], timeout=2)
    assert gen["status"] == "cancelled" and gen["cancel_reason"] == "stop_request", gen
    meter = model_stopped(server, gen)
    assert meter.get("status") == "disconnected" and meter["tokens_generated"] == 5, meter
    context.close()
