"""The chat page in real headless Chromium against real gunicorn and the demo model."""
import os
import re
import time

import pytest
from playwright.sync_api import expect

from conftest import require_binary
from harness import ROOT, get_json

ARTIFACTS = os.path.join(ROOT, "test-artifacts")
# Debian's Chromium as root in a closed network (see the env notes): no sandbox, no
# background traffic, no GPU.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
STREAMING = "Stop generating"


@pytest.fixture(scope="module")
def browser():
    executable = require_binary("chromium")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, demo_server):
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("dialog", lambda dialog: (page.errors.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.goto(demo_server.url + "/")
    yield page
    assert page.errors == []
    context.close()


def send(page, text):
    page.fill("#prompt", text)
    page.keyboard.press("Enter")


def last_answer(page):
    return page.locator("article.assistant").last


def wait_tokens(page, count, timeout=10):
    """Wait until the streaming answer shows `count` words."""
    deadline = time.monotonic() + timeout
    while len(last_answer(page).locator(".text").inner_text().split()) < count:
        assert time.monotonic() < deadline, "the answer did not stream"
        time.sleep(0.02)


def wait_status(page, status, timeout=10):
    last_answer(page).locator(f'xpath=self::*[@data-status="{status}"]').wait_for(timeout=timeout * 1000)


def latest_generation(server):
    return server.list("limit=1")["generations"][0]


def test_send_streams_token_by_token_and_the_button_swaps(page):
    send(page, "/words 30 /rate 20")
    stop = page.get_by_role("button", name=STREAMING)
    stop.wait_for()
    lengths = []
    for _ in range(5):
        time.sleep(0.2)
        lengths.append(len(last_answer(page).locator(".text").inner_text()))
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1], lengths  # it grows while streaming
    wait_status(page, "complete")
    assert len(last_answer(page).locator(".text").inner_text().split()) == 30
    expect(page.get_by_role("button", name="Send")).to_be_visible()  # when the response ends
    assert re.search(r"first token \d+ ms · 30 tokens · \d+\.\d s", last_answer(page).inner_text())
    assert page.locator("#transcript").get_attribute("aria-live") == "polite"


def no_stop_requests(target):
    """Drop the page's stop requests, so only the aborted fetch can tell the server."""
    target.route("**/api/generations/*/stop", lambda route: route.abort())
    target.add_init_script("navigator.sendBeacon = () => true;")  # beacons bypass routes: a lost one


def test_stop_keeps_the_partial_answer_and_the_model_really_stops(page, demo_server):
    no_stop_requests(page)  # this test is the abort link's; test_stop_through_proxies.py covers the request
    send(page, "/words 60 /rate 20")
    wait_tokens(page, 8)
    page.get_by_role("button", name=STREAMING).click()
    clicked = time.monotonic()
    wait_status(page, "stopped")
    shown = last_answer(page).locator(".text").inner_text()
    time.sleep(0.5)
    assert last_answer(page).locator(".text").inner_text() == shown  # kept, and nothing more arrives
    assert 8 <= len(shown.split()) < 60
    gen = latest_generation(demo_server)
    while gen["status"] == "streaming" and time.monotonic() - clicked < 1:
        gen = latest_generation(demo_server)
    assert gen["status"] == "cancelled" and gen["cancel_reason"] == "client_disconnect"
    assert gen["text"].startswith(shown.rstrip())
    meter = get_json(f"{demo_server.url}/demo/v1/requests/{gen['upstream_request_id']}")
    assert meter["status"] == "disconnected" and meter["tokens_after_disconnect"] <= 1
    answer = last_answer(page)
    answer.get_by_text(re.compile(r"model made \d tokens? after Stop")).wait_for()
    # The provider sent no usage for the cut answer: the server's lower bound is shown.
    assert f"≥ {gen['usage_estimate']['output_tokens']} tokens" in answer.inner_text()
    assert answer.locator(".badge").inner_text() == "Stopped"
    assert answer.get_by_role("button", name="Regenerate").is_visible()
    assert page.get_by_role("button", name="Send").is_visible()
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "stopped-message.png"))


def test_regenerate_replaces_the_stopped_answer(page):
    send(page, "/words 40 /rate 20")
    wait_tokens(page, 3)
    page.keyboard.press("Escape")
    wait_status(page, "stopped")
    with page.expect_request("**/api/chat") as request:
        last_answer(page).get_by_role("button", name="Regenerate").click()
    assert [m["role"] for m in request.value.post_data_json["messages"]] == ["user"]
    wait_status(page, "complete")
    assert page.locator("article.assistant").count() == 1


def test_follow_up_carries_the_partial_answer(page):
    send(page, "/words 40 /rate 20")
    wait_tokens(page, 4)
    page.keyboard.press("Escape")  # Escape stops too
    wait_status(page, "stopped")
    partial = last_answer(page).locator(".text").inner_text()
    with page.expect_request("**/api/chat") as request:
        send(page, "/words 3 go on")
    sent = request.value.post_data_json["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"].strip() == partial.strip() and sent[2]["content"] == "/words 3 go on"
    wait_status(page, "complete")


def test_a_new_message_while_streaming_stops_the_old_one_first(page, demo_server):
    send(page, "/words 60 /rate 20")
    wait_tokens(page, 3)
    first_id = latest_generation(demo_server)["id"]
    send(page, "/words 3 and now this")
    wait_status(page, "complete")
    answers = page.locator("article.assistant")
    assert answers.count() == 2
    assert answers.first.get_attribute("data-status") == "stopped"
    time.sleep(0.3)
    assert get_json(f"{demo_server.url}/api/generations/{first_id}")["status"] == "cancelled"


def test_closing_the_tab_mid_stream_cancels_on_the_server(browser, demo_server):
    context = browser.new_context()
    no_stop_requests(context)
    page = context.new_page()
    page.goto(demo_server.url + "/")
    send(page, "/words 60 /rate 20")
    wait_tokens(page, 3)
    gen_id = latest_generation(demo_server)["id"]
    page.close()
    closed = time.monotonic()
    gen = demo_server.wait_finished(gen_id, timeout=1)
    assert time.monotonic() - closed < 1.5
    assert gen["status"] == "cancelled" and gen["cancel_reason"] == "client_disconnect"
    context.close()


def test_the_conversation_survives_a_reload_and_new_chat_clears_it(page):
    send(page, "/words 5 remember me")
    wait_status(page, "complete")
    text = last_answer(page).locator(".text").inner_text()
    page.reload()
    assert page.locator("article.user").inner_text() == "/words 5 remember me"
    assert last_answer(page).locator(".text").inner_text() == text
    assert last_answer(page).get_attribute("data-status") == "complete"
    page.get_by_role("button", name="New chat").click()
    assert page.locator("article").count() == 0
    page.reload()
    assert page.locator("article").count() == 0


def test_model_output_is_shown_as_text_never_run(page, demo_server):
    payload = "<img src=x onerror=alert(1)> <script>alert(2)</script> <b>bold</b>"
    send(page, "/echo " + payload)
    wait_status(page, "complete")
    assert last_answer(page).locator(".text").inner_text() == payload
    assert page.locator("#transcript img, #transcript script, #transcript b").count() == 0
    csp = page.request.get(demo_server.url + "/").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    # page.errors (checked on teardown) would hold the alert() dialog had it run.


def test_an_error_event_shows_as_an_error_with_retry(page):
    send(page, "/fail /rate 50")
    wait_status(page, "error")
    answer = last_answer(page)
    assert answer.locator(".badge").inner_text() == "Error"
    assert "simulated failure" in answer.locator(".error-text").inner_text()
    with page.expect_request("**/api/chat") as request:
        answer.get_by_role("button", name="Retry").click()
    assert [m["role"] for m in request.value.post_data_json["messages"]] == ["user"]
    wait_status(page, "error")
    assert page.locator("article.assistant").count() == 1


def test_a_network_failure_is_an_error_not_a_stop(page):
    page.route("**/api/chat", lambda route: route.abort("connectionreset"))
    send(page, "hello")
    wait_status(page, "error")
    assert "Network error" in last_answer(page).locator(".error-text").inner_text()
    assert last_answer(page).get_by_role("button", name="Retry").is_visible()


def test_keyboard_only_use(page):
    page.focus("#prompt")
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("/words 3")
    assert page.input_value("#prompt") == "line one\n/words 3"
    page.keyboard.press("Enter")
    wait_status(page, "complete")
    assert page.evaluate("document.activeElement.id") == "prompt"
    assert page.locator("article.user").inner_text() == "line one\n/words 3"


def test_layout_fits_a_phone(browser, demo_server):
    context = browser.new_context(viewport={"width": 360, "height": 700})
    page = context.new_page()
    page.goto(demo_server.url + "/")
    send(page, "/echo " + "averyveryverylongwordwithoutanyspaces" * 5)
    wait_status(page, "complete")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    # The button swaps back when the response ends, a moment after `done` set the status.
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    context.close()


def test_stop_racing_the_end_agrees_with_the_server_log(page, demo_server):
    """The server finished the answer, but Stop lands before the browser saw `done`."""
    held = []
    page.route("**/api/chat", lambda route: held.append(route))  # hold the response back
    send(page, "/words 5 /rate 50")
    while not held:
        page.wait_for_timeout(20)
    finished = held[0].fetch()  # the real request runs to its end on the server
    assert b"event: done" in finished.body()
    page.get_by_role("button", name=STREAMING).click()  # ... and only now does the user press Stop
    wait_status(page, "complete")
    gen = latest_generation(demo_server)
    assert gen["status"] == "complete"
    assert last_answer(page).locator(".text").inner_text() == gen["text"].strip()
    assert last_answer(page).locator(".badge").inner_text() == "Complete"
    try:
        held[0].abort()
    except Exception:
        pass  # the page already dropped that request
