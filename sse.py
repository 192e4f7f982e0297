"""Server-Sent Events whose Stop really stops: the cancellation core. Copy this file.

The chain is browser -> nginx -> gunicorn (gevent worker) -> this relay -> upstream model.
This module holds the links that live in the worker:

  client -> worker    EventStream watches the client socket from the first moment and
                      treats EOF/reset as Stop, without waiting for the next write;
                      a failed write (GeneratorExit) is the second line.
  worker -> upstream  Stop sends the provider its FIN at once (once the body is being read),
                      then kills the producer greenlet: Cancelled is raised wherever it is
                      blocked (connect, waiting for headers, reading the body), and
                      requests/urllib3 close that connection instead of pooling it.
  upstream -> worker  iter_chunks() passes bytes on as they arrive and refuses a body
                      that ends mid-event, so no truncated event is ever relayed.

Needs gevent (and a monkey-patched or gevent socket, as gunicorn's gevent worker gives).
"""
import json
import socket
import time

import gevent
from gevent.queue import Empty, Queue
from sseclient import SSEClient


class ServerSentEvent:
    """One event of a text/event-stream; encode() is the whole wire format."""

    __slots__ = ("event", "data", "comment")

    def __init__(self, event=None, data=None, comment=None):
        self.event, self.data, self.comment = event, data, comment

    def encode(self):
        """Return the event as bytes, data as JSON unless it is already a string."""
        lines = []
        if self.comment is not None:
            lines.append(": " + self.comment)
        if self.event:
            lines.append("event: " + self.event)
        if self.data is not None:
            text = self.data if isinstance(self.data, str) else json.dumps(self.data, ensure_ascii=False)
            # https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
            lines.extend("data: " + line for line in text.split("\n"))
        return ("\n".join(lines) + "\n\n").encode()


# A comment is real bytes on the wire: proxies and browsers see traffic, EventSource ignores it.
# (Yielding b"" from a WSGI body writes nothing at all, so it keeps nothing alive.)
KEEPALIVE = ServerSentEvent(comment="keepalive").encode()


class Cancelled(gevent.GreenletExit):
    """Raised inside the producer when its stream is stopped; `reason` says why."""

    def __init__(self, reason, stopped_at=None):
        super().__init__(reason)
        self.reason = reason
        self.stopped_at = stopped_at  # time.monotonic() when the stop was signalled


_END = object()
_live = set()  # this worker's open streams, so a shutdown can stop them all


def stop_all(reason="server_shutdown"):
    """Stop every open stream of this worker, e.g. when gunicorn starts shutting it down."""
    for stream in list(_live):
        stream.stop(reason)


class EventStream:
    """A WSGI response body that relays `events` (an iterator of ServerSentEvent).

    The events run in their own greenlet beside a watcher of the client socket; whichever
    ends first ends the other. Keepalive comments fill any silence of `keepalive` seconds.
    """

    def __init__(self, events, environ, keepalive=15.0):
        self._events = events
        # gunicorn passes the client socket; so does werkzeug's dev server.
        self._sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
        self._keepalive = keepalive
        self._queue = Queue()
        self._producer = None
        self.reason = None  # why the stream was stopped, if it was
        self.stopped_at = None
        self.upstream = None  # the upstream response being read (set by iter_chunks)
        self._body = self._run()

    def __iter__(self):
        return self._body

    def close(self):
        """Called by the WSGI server when the response ends, however it ends."""
        self._body.close()

    def stop(self, reason):
        """End the stream for `reason`; callable from any greenlet."""
        if self.reason is None and self._producer is not None and not self._producer.dead:
            self.reason, self.stopped_at = reason, time.monotonic()
            # urllib3 sets connection to None once it has pooled or closed it.
            connection = getattr(getattr(self.upstream, "raw", None), "connection", None)
            if getattr(connection, "sock", None) is not None:
                # The body is being read: the provider gets its FIN now. The producer's
                # unwinding can then wait until the loop has seen every other client that
                # left: with many leaving at once, no FIN waits for another's teardown.
                try:
                    _os_socket(connection.sock).shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # already gone
                gevent.spawn(self._kill_when_idle, reason)
            else:
                # Connecting or waiting for headers: Cancelled, raised where the producer
                # waits, is what closes the connection.
                self._producer.kill(Cancelled(reason, self.stopped_at), block=False)

    def _kill_when_idle(self, reason):
        when_idle()
        # Unless the producer has let go of the provider already (it took the provider's
        # reply to our FIN as the Stop): a kill now would only cut its last events short.
        if getattr(getattr(self.upstream, "raw", None), "connection", None) is not None:
            self._producer.kill(Cancelled(reason, self.stopped_at), block=False)

    def _run(self):
        self._producer = gevent.spawn(self._produce)
        self._producer.event_stream = self  # how iter_chunks finds the stream it feeds
        self._producer.link(lambda _: self._queue.put(_END))  # even if killed before it ran
        watcher = watch_disconnect(self._sock, self.stop) if self._sock is not None else None
        _live.add(self)
        try:
            while True:
                try:
                    item = self._queue.get(timeout=None if self.reason else self._keepalive)
                except Empty:
                    yield KEEPALIVE
                    continue
                if item is _END:
                    return
                # After a server shutdown the client is still there for the last events.
                if self.reason != "client_disconnect":
                    yield item.encode()
        except GeneratorExit:
            self.stop("client_disconnect")  # a write failed: the second line of detection
            raise
        except gevent.GreenletExit:
            self.stop("server_shutdown")  # gunicorn killed this handler after graceful_timeout
            raise
        finally:
            _live.discard(self)
            if watcher is not None:
                watcher.close()
            self.stop("client_disconnect")
            self._producer.join()  # the producer has closed the upstream and written its row

    def _produce(self):
        for event in self._events:
            self._queue.put(event)


def when_idle(at_most=0.05):
    """Wait until the event loop has nothing else to do, or `at_most` seconds at the longest."""
    with gevent.Timeout(at_most, False):  # a saturated loop is never idle
        gevent.idle()


def watch_disconnect(sock, stop):
    """Call stop("client_disconnect") from the loop once the client socket reports EOF or an error.

    Returns the watcher, to close() when the response ends, or None for a socket that can't
    peek (a stdlib TLS socket), which leaves the write path. A loop callback rather than a
    greenlet per stream: when hundreds of clients leave at once, each one is seen sooner.
    """
    raw = _os_socket(sock)
    try:
        raw.recv(0, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except ValueError:
        return None
    except OSError:
        pass  # gone already: the watcher sees that at once
    _detect_dead_peer(sock)
    loop = gevent.get_hub().loop
    # 1: readable, as EOF and errors are. The highest priority: in a loop turn that also
    # wakes producers to unwind, every client that left is seen (and its FIN sent) first.
    watcher = loop.io(sock.fileno(), 1, priority=getattr(loop, "MAXPRI", 0))

    def readable():
        try:
            # Peek: any bytes belong to the server's next request, not to us.
            gone = not raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return  # woken without data
        except OSError:
            gone = True  # ECONNRESET, or ETIMEDOUT from the dead-peer timers
        watcher.stop()  # pipelined bytes keep it readable: then only the write path is left
        if gone:
            stop("client_disconnect")

    watcher.start(readable)
    return watcher


def _os_socket(sock):
    """Return the OS socket inside a gevent socket (plain or TLS), or `sock` itself."""
    # gevent's recv waits on EAGAIN, which a loop callback must never do; a TLS socket's
    # own shutdown() would also drop its TLS state under the greenlet still reading it.
    return getattr(sock, "_sock", sock)


def _detect_dead_peer(sock):
    """Make the kernel error a connection whose peer vanished without FIN or RST within ~10 s."""
    # Keepalive probes cover silence; TCP_USER_TIMEOUT covers data left unacknowledged
    # (RFC 5482). Without them a pulled cable looks alive for 15+ minutes.
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), 5),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), 2),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 3),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), 10_000),
    ]
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    for level, name, value in options:
        try:
            sock.setsockopt(level, name, value)
        except (OSError, TypeError):
            pass  # an option this kernel lacks (TypeError: no such constant here) is not a Stop


class TruncatedStream(Exception):
    """The upstream body ended in the middle of an event or line."""


SSE_ENDS = (b"\n\n", b"\r\r", b"\r\n\r\n")


def iter_chunks(response, ends=SSE_ENDS):
    """Yield a streamed requests response's body as it arrives; raise TruncatedStream at a cut end."""
    # read1 returns whatever has arrived, for chunked and close-delimited bodies alike;
    # iterating the response or SSEClient(response) reads fixed blocks and batches events.
    stream = getattr(gevent.getcurrent(), "event_stream", None)
    if stream is not None:
        stream.upstream = response  # so a Stop can send the provider its FIN at once
    tail = b""
    try:
        while chunk := response.raw.read1(65536):
            tail = (tail + chunk)[-4:]
            yield chunk
    except Exception:
        if stream is not None and stream.reason:
            raise Cancelled(stream.reason, stream.stopped_at) from None  # the provider hung up on our FIN
        raise
    if stream is not None and stream.reason:
        raise Cancelled(stream.reason, stream.stopped_at)  # the provider ended the body on our FIN
    if tail and not tail.endswith(ends):
        # sseclient-py would hand the partial event on as if it were whole.
        raise TruncatedStream("upstream closed the connection in the middle of an event")


def sse_events(response):
    """Yield the sseclient Events of a streamed text/event-stream response as they arrive."""
    return SSEClient(iter_chunks(response)).events()
