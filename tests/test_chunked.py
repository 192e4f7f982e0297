"""The provider's chunked body as sse.iter_chunks reads it through the relay's session, over a real socket.

Every cut of the framing gives the body whole; a whole body gives its connection back to the
pool (the next answer reuses it); a body cut short is a ProtocolError (upstream_disconnected)
and its connection is never reused.
"""
import socket
import sys
import threading
import time

import pytest
import requests
import urllib3

from harness import ROOT

sys.path.insert(0, ROOT)
import sse  # noqa: E402
from providers.base import _Adapter  # noqa: E402  the relay's 1 KB read buffer, as in production

EVENTS = b"data: one\n\n" + b"data: " + "twö €".encode() + b"\n\n" + b"data: " + b"x" * 3000 + b"\n\n"


def chunked(body, sizes=(11, 5, 3000, 14), extension=b"", trailers=b""):
    """Frame `body` as chunks of `sizes` (the rest in one more), then the last chunk and `trailers`."""
    out, at = b"", 0
    for size in [*sizes, len(body)]:
        if at < len(body):
            piece = body[at:at + size]
            out += b"%x%s\r\n%s\r\n" % (len(piece), extension, piece)
            at += size
    return out + b"0\r\n" + trailers + b"\r\n"


class Provider:
    """Answers each request on a connection with the next of `answers`, sent in `split`-byte writes."""

    def __init__(self, answers, split=None):
        self.answers, self.split, self.connections = list(answers), split, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            conn, _ = self.listener.accept()
            self.connections += 1
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        with conn:
            while self.answers:
                request = b""
                while b"\r\n\r\n" not in request:
                    data = conn.recv(65536)
                    if not data:
                        return
                    request += data
                body, close = self.answers.pop(0)
                head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                conn.sendall(head)
                step = self.split or len(body) or 1
                for at in range(0, len(body), step):
                    conn.sendall(body[at:at + step])
                    if self.split:
                        time.sleep(0.0005)  # each piece its own read: framing cut anywhere
                if close:
                    return


def session():
    s = requests.Session()
    s.mount("http://", _Adapter())
    return s


def read(http, provider):
    with http.get(provider.url, stream=True, timeout=5) as resp:
        assert resp.raw.chunked
        return b"".join(sse.iter_chunks(resp))


@pytest.mark.parametrize("split", [None, 1, 7])
def test_every_cut_of_the_framing_gives_the_body_whole_and_the_connection_back(split):
    """Size lines, data and CRLFs cut across reads anywhere; the next response reuses the connection."""
    provider = Provider([(chunked(EVENTS), False), (chunked(b"data: next\n\n"), False)], split=split)
    http = session()
    assert read(http, provider) == EVENTS
    assert read(http, provider) == b"data: next\n\n"
    assert provider.connections == 1


def test_chunk_extensions_and_trailers():
    """A chunk extension is ignored; trailer lines are read to their end, so the next response parses."""
    provider = Provider([(chunked(EVENTS, extension=b";name=value"), False),
                         (chunked(EVENTS, trailers=b"X-Usage: 12\r\nX-Other: y\r\n"), False),
                         (chunked(b"data: after\n\n"), False)], split=5)
    http = session()
    assert read(http, provider) == EVENTS
    assert read(http, provider) == EVENTS
    assert read(http, provider) == b"data: after\n\n"
    assert provider.connections == 1


@pytest.mark.parametrize("body, closes", [
    (b"b\r\ndata: one\n\n\r\n5\r\ndat", True),      # cut in a chunk's data
    (b"b\r\ndata: one\n\n\r\n", True),              # cut before a size line
    (b"b\r\ndata: one\n\n\r\n1", True),             # cut in a size line
    (b"b\r\ndata: one\n\n", True),                  # cut before a chunk's CRLF
    (b"zz\r\ndata\r\n", False),                     # a size that is not one
    (b"b\r\ndata: one\n\n\r\n0x\r\n", False),
])
def test_a_cut_body_or_a_bad_size_is_a_protocol_error_and_the_connection_is_not_reused(body, closes):
    provider = Provider([(body, closes), (chunked(b"data: next\n\n"), False)])
    http = session()
    with pytest.raises(urllib3.exceptions.ProtocolError):
        read(http, provider)
    assert read(http, provider) == b"data: next\n\n"
    assert provider.connections == 2
