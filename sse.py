"""Server-Sent Events whose Stop really stops: the cancellation core. Copy this file.

The chain is browser -> nginx -> gunicorn (gevent worker) -> this relay -> upstream model.
This module holds the links that live in the worker:

  client -> worker    EventStream watches the client socket from the first moment and
                      treats EOF/reset as Stop, without waiting for the next write;
                      a failed write (GeneratorExit) is the second line.
  worker -> upstream  Stop sends the provider its FIN at once (once the socket is connected),
                      then kills the producer greenlet: Cancelled is raised wherever it is
                      blocked (connect, waiting for headers, reading the body), and
                      requests/urllib3 close that connection instead of pooling it.
  upstream -> worker  iter_chunks() passes bytes on as they arrive and refuses a body
                      that ends mid-event, so no truncated event is ever relayed; with
                      waits=True it yields WAIT when there are none yet, and EventStream
                      waits for the provider at the top of the stack (see WAIT).

With init_app(app), the response's own greenlet reads the provider and writes each event
to the client itself (one greenlet per stream; a keepalive gets a greenlet for its write);
without it a producer greenlet reads and hands every event to the response's greenlet.
Either way a Stop lands between writes, never inside one.

Servers: gunicorn's gevent worker (monkey-patched: the fast path, everything on one loop);
gunicorn's gthread worker and `flask run` (threads: the producer gets a thread of its own,
one watcher thread per process polls every client socket, and a Stop shuts the provider's
socket down so the thread blocked on it wakes, then raises Cancelled in that thread).
A server that can't serve a stream (gunicorn's sync worker) gets a clear error.
"""
import ctypes
import json
import logging
import os
import queue
import selectors
import socket
import threading
import time
from functools import partial

import gevent
from gevent.hub import Waiter
from sseclient import SSEClient
import urllib3.connection
import urllib3.util.connection

log = logging.getLogger("sse")


class ServerSentEvent:
    """One event of a text/event-stream; encode() is the whole wire format."""

    __slots__ = ("event", "data", "comment")

    def __init__(self, event=None, data=None, comment=None):
        self.event, self.data, self.comment = event, data, comment

    def encode(self):
        """Return the event as bytes, data as JSON unless it is already a string."""
        text = self.data if self.data is None or isinstance(self.data, str) else to_json(self.data)
        out = "" if self.comment is None else f": {self.comment}\n"
        if self.event:
            out += f"event: {self.event}\n"
        if text is not None:
            # One data line per line (JSON has none: it escapes line breaks).
            # https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
            out += "data: " + text.replace("\n", "\ndata: ") + "\n"
        return (out + "\n").encode()


# One encoder for every event: json.dumps(..., ensure_ascii=False) would build a new one each time.
# A string alone takes the encoder's fast path (app.py builds the per-token `delta` with it).
to_json = json.JSONEncoder(ensure_ascii=False).encode

# A comment is real bytes on the wire: proxies and browsers see traffic, EventSource ignores it.
# (Yielding b"" from a WSGI body writes nothing at all, so it keeps nothing alive.)
KEEPALIVE = ServerSentEvent(comment="keepalive")


class Cancelled(gevent.GreenletExit):
    """Raised inside the producer when its stream is stopped; `reason` says why."""

    def __init__(self, reason, stopped_at=None):
        super().__init__(reason)
        self.reason = reason
        self.stopped_at = stopped_at  # time.monotonic() when the stop was signalled


_END = object()

# Yielded up through the events, instead of waiting under them, when the provider has sent
# nothing more yet (iter_chunks and sse_events with waits=True; each generator between them
# and EventStream passes it on: `if event is WAIT: yield WAIT`). EventStream then waits for
# the provider at the top of the stack: a waiting greenlet keeps its C stack in the heap,
# ~0.7 KB for each generator it waits under, for as long as the stream is silent.
WAIT = object()
_live = set()  # this worker's open streams, so a shutdown can stop them all


def stop_all(reason="server_shutdown"):
    """Stop every open stream of this worker, e.g. when gunicorn starts shutting it down."""
    for stream in list(_live):
        stream.stop(reason)


WRITE_KEY = "sse.write"


def init_app(app):
    """Pass the server's write() callable on in the environ, so a stream runs in one greenlet: the response's own reads and writes its events."""
    # start_response returns it (PEP 3333) and werkzeug's Response drops it. Without this,
    # EventStream still works: a producer greenlet then hands every event to the response's.
    wsgi_app = app.wsgi_app

    def keeping_write(environ, start_response):
        def start(status, headers, exc_info=None):
            environ[WRITE_KEY] = write = start_response(status, headers, exc_info)
            return write
        return wsgi_app(environ, start)

    app.wsgi_app = keeping_write


class UnsupportedServer(RuntimeError):
    """The WSGI server can't serve a stream whose Stop stops; the message says why and what to run."""


def _cooperative():
    """Tell whether sockets are gevent's (monkey-patched), so greenlets can run the stream."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("socket")


SOCKET_KEYS = ("gunicorn.socket", "werkzeug.socket")
_warned = set()


def _check_server(environ):
    """Return True for the greenlet path, False for threads; raise UnsupportedServer for a server that can't stream."""
    if _cooperative():
        return True
    if not isinstance(gevent.getcurrent(), gevent.Greenlet) and environ.get("wsgi.multithread"):
        return False
    if isinstance(gevent.getcurrent(), gevent.Greenlet):
        raise UnsupportedServer("a gevent server without monkey-patching: the provider's socket would block the whole"
                                " worker. Call gevent.monkey.patch_all() first (gunicorn -k gevent does), or run"
                                " gunicorn -k gthread.")
    raise UnsupportedServer("this server runs one request at a time per process (gunicorn's sync worker, or"
                            " flask run --without-threads): a stream holds it, and gunicorn's sync `timeout` (30 s by"
                            " default) kills any longer stream. Run gunicorn -k gevent (one process, many streams) or"
                            " gunicorn -k gthread --threads N.")


class EventStream:
    """A WSGI response body that relays `events` (an iterator of ServerSentEvent).

    The events run in the response's greenlet (with init_app), or in a greenlet or thread of
    their own, beside a watcher of the client socket; whichever ends first ends the other.
    Keepalive comments fill any silence of `keepalive` seconds.
    """

    def __init__(self, events, environ, keepalive=15.0):
        self._events = events
        self._threads = not _check_server(environ)
        # gunicorn passes the client socket; so does werkzeug's dev server.
        self._sock = next((environ[key] for key in SOCKET_KEYS if environ.get(key) is not None), None)
        if self._sock is None and environ.get("SERVER_SOFTWARE") not in _warned:
            _warned.add(environ.get("SERVER_SOFTWARE"))
            log.warning("no client socket in the WSGI environ (looked for %s) under %s: a client that leaves is"
                        " noticed only when a write fails", " or ".join(SOCKET_KEYS), environ.get("SERVER_SOFTWARE"))
        self._keepalive = keepalive
        self._environ = environ
        # Events the producer has read and the writer not yet sent: threads share a Queue;
        # greenlets a list and a Waiter, as cheap a hand-over as gevent has (see _put).
        self._queue = queue.Queue() if self._threads else None
        self._ready, self._waiter, self._quiet, self._watcher = [], None, None, None
        self._write, self._writing, self._kill_after_write = None, False, False
        self._producer, self._inline, self._pinger = None, False, None
        self._reader, self._thrown = None, None  # the provider's socket a WAIT waits on; what interrupted that wait
        self.reason = None  # why the stream was stopped, if it was
        self.stopped_at = None
        self.upstream = None  # the upstream response being read (set by iter_chunks)
        self._upstream_sock = None  # the provider's socket, from before it connects
        self._lock = threading.Lock()
        self._producing = False
        self._body = self._run()

    def __iter__(self):
        return self._body

    def close(self):
        """Called by the WSGI server when the response ends, however it ends."""
        self._body.close()

    def stop(self, reason):
        """End the stream for `reason`; callable from any greenlet or thread."""
        if self._threads:
            return self._stop_thread(reason)
        if self.reason is None and self._producing:
            self.reason, self.stopped_at = reason, time.monotonic()
            # urllib3 sets connection to None once it has pooled or closed it.
            connection = getattr(getattr(self.upstream, "raw", None), "connection", None)
            if getattr(connection, "sock", None) is not None:
                # The body is being read: the provider gets its FIN now. The producer's
                # unwinding can then wait until the loop has seen every other client that
                # left: with many leaving at once, no FIN waits for another's teardown.
                _send_fin(connection.sock)
                _kill_when_idle(self)
            else:
                if self.upstream is None and self._upstream_sock is not None:
                    # Waiting for headers: the provider gets its FIN now as well (the
                    # kill's unwinding, ~0.3 ms of Python, closes it a little later).
                    _send_fin(self._upstream_sock)
                # Cancelled, raised where the producer waits, closes the connection.
                self._kill()

    def _kill(self):
        """Raise Cancelled where the producer waits, from the loop; if it is writing to the client, once that write is done."""
        self._loop.run_callback(self._cancel)

    def _cancel(self):
        # Checked here, in the loop: meanwhile the producer may have begun a write, or (the
        # response's own greenlet) finished the events and gone back to gunicorn.
        if self._writing:
            self._kill_after_write = True  # a kill inside the write would leave the client half an event
        elif self._inline:
            if self._producing:
                self._producer.throw(Cancelled(self.reason, self.stopped_at))
        else:
            self._producer.kill(Cancelled(self.reason, self.stopped_at), block=False)  # even before it ran

    def _run(self):
        """Run the events here (init_app), or yield the producer's as bytes, all that are ready in one write; until they end."""
        # One generator, not one per stage: a greenlet parked under each generator it
        # resumes keeps ~0.9 KB more of C stack for as long as the stream is open.
        if self._threads:
            self._start_threads()
        else:
            self._start()
        _live.add(self)
        try:
            if self._inline:
                return self._produce()
            while True:
                events = self._take()
                # After a server shutdown the client is still there for the last events.
                if self.reason != "client_disconnect" and (data := b"".join([e.encode() for e in events if e is not _END])):
                    yield data
                if events[-1] is _END:
                    return
        except GeneratorExit:
            self.stop("client_disconnect")  # a write failed: the second line of detection
            raise
        except Cancelled:
            pass  # the response's own greenlet, stopped in events that let Cancelled through
        except gevent.GreenletExit:
            self.stop("server_shutdown")  # gunicorn killed this handler after graceful_timeout
            raise
        finally:
            _live.discard(self)
            self._unwatch()
            self.stop("client_disconnect")
            if self._inline:
                del self._producer.event_stream  # gunicorn's greenlet serves the connection's next request
                if self._pinger is not None:
                    self._pinger.join()  # a keepalive's write, before gunicorn ends the body
            else:
                self._producer.join()  # the producer has closed the upstream and written its row

    def _start(self):
        """Start the client watcher and the keepalive timer, and the producer greenlet if one is needed; on the first next()."""
        self._loop = gevent.get_hub().loop
        self._write = self._environ.get(WRITE_KEY)  # set by init_app(app), once start_response has run
        # One greenlet per stream when the events can be written without yielding them: a
        # second one, parked, costs ~6 KB of memory for as long as the stream is open.
        self._inline = self._write is not None
        if self._inline:
            self._producer = gevent.getcurrent()
        else:
            self._producer = gevent.spawn(self._produce)
            self._producer.link(lambda _: self._put(_END))  # even if killed before it ran
        self._producer.event_stream = self  # how iter_chunks finds the stream it feeds
        self._producing = True
        self._watcher = watch_disconnect(self._sock, self.stop) if self._sock is not None else None
        if self._keepalive:
            self._quiet = Quiet(self._keepalive, self._keepalive_due)  # touched by every write

    def _unwatch(self):
        """Stop watching the client and the silence, once the response ends."""
        if self._threads:
            if self._sock is not None:
                _ThreadWatcher.get().remove(self._sock)
            return
        if self._quiet is not None:
            self._quiet.close()
        if self._watcher is not None:
            self._watcher.close()

    def _produce(self):
        try:
            for event in self._events:
                if event is WAIT:
                    self._wait_upstream()
                else:
                    self._emit(event)
        finally:
            self._producing = False

    def _wait_upstream(self):
        """Wait here, at the top of the stack, until the provider sends more; on a WAIT from the events."""
        wait = self._reader.wait  # the socket of the iter_chunks that yielded the WAIT
        try:
            wait()
        except BaseException as exc:  # noqa: BLE001 - re-raised below the WAIT, where the events' handlers see it
            # Cancelled, the read timeout, gunicorn's kill: iter_chunks raises it on resuming.
            self._thrown = exc

    def _emit(self, event):
        """Write the producer's event to the client (init_app: the response's own greenlet); else hand it to the writer."""
        # Written where it was read: no second greenlet to wake per event, and none parked
        # for the stream's life (~6 KB: README, capacity, ninth round).
        if not self._inline:
            return self._put(event)
        if self._pinger is not None:
            self._pinger.join()  # a keepalive is being written
        if self.reason != "client_disconnect":
            self._send(event.encode())

    def _send(self, data):
        """Write `data` to the client with the server's write(); a Stop that comes meanwhile waits for the write."""
        self._writing = True
        try:
            self._write(data)
        except OSError:
            self.stop("client_disconnect")  # a failed write: the second line of detection
        finally:
            self._writing = False
        if self._quiet is not None:
            self._quiet.touch()
        if self._kill_after_write:
            self._kill_after_write = False
            self._kill()  # lands where the producer next waits

    def _ping(self):
        self._send(KEEPALIVE.encode())
        self._pinger = None

    def _put(self, event):
        """Hand an event to the writer: called by the producer, and in the loop by a keepalive or the end."""
        self._ready.append(event)
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            # Only the loop may switch to a waiting greenlet; events read meanwhile join this one write.
            self._loop.run_callback(waiter.switch, None)

    def _take(self):
        """Return every event that is ready, waiting for one if none is."""
        if self._threads:
            return self._take_thread()
        while not self._ready:
            self._waiter = Waiter()
            self._waiter.get()
        events, self._ready = self._ready, []
        if self._quiet is not None:
            self._quiet.touch()
        return events

    def _keepalive_due(self):
        if self.reason is None and self._producing and not self._writing:
            if self._inline:
                # In the loop, which must not wait on a full socket: a greenlet writes it.
                self._pinger = gevent.spawn(self._ping)
            else:
                self._put(KEEPALIVE)

    # -- threads (gunicorn -k gthread, flask run) ------------------------------------------

    def _start_threads(self):
        """Start the producer thread and watch the client socket from the process's watcher thread."""
        self._producing = True
        self._producer = threading.Thread(target=self._produce_thread, name="sse-producer", daemon=True)
        self._producer.start()
        if self._sock is not None:
            _ThreadWatcher.get().add(self._sock, self)

    def _take_thread(self):
        try:
            events = [self._queue.get(timeout=None if self.reason else self._keepalive)]
        except queue.Empty:
            return [KEEPALIVE]
        while events[-1] is not _END and not self._queue.empty():
            events.append(self._queue.get())
        return events

    def _produce_thread(self):
        _current.stream = self  # so the urllib3 hook and iter_chunks find this stream
        try:
            try:
                for event in self._events:
                    self._queue.put(event)
            finally:
                with self._lock:  # from here on no Cancelled is raised into this thread
                    self._producing = False
        except Cancelled:
            pass  # raised by _stop_thread where the producer was, after the events' own handlers
        finally:
            _current.stream = None
            self._queue.put(_END)

    def _stop_thread(self, reason):
        with self._lock:
            if self.reason is not None or not self._producing:
                return
            self.reason, self.stopped_at = reason, time.monotonic()
            # Cancelled is raised in the producer thread as soon as it runs Python again,
            # wherever it is, as a greenlet kill would be...
            # https://docs.python.org/3/c-api/init.html#c.PyThreadState_SetAsyncExc
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._producer.ident),
                                                       ctypes.py_object(_cancelled_class(reason, self.stopped_at)))
            sock = self._upstream_sock
        # ... and a thread blocked on the provider's socket runs Python again once the socket
        # is shut down: connecting (Linux aborts a SYN_SENT connect), waiting for headers,
        # reading the body. The provider sees the connection close now.
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected yet or already gone: the raised Cancelled ends it


def _cancelled_class(reason, stopped_at):
    """A Cancelled subclass that knows its reason: PyThreadState_SetAsyncExc takes a class."""
    return type("Cancelled", (Cancelled,), {"__init__": lambda self: Cancelled.__init__(self, reason, stopped_at)})


_current = threading.local()  # threads: the stream whose producer runs in this thread


def _stream_here():
    """Return the stream whose producer runs in this greenlet or thread, or None."""
    return getattr(gevent.getcurrent(), "event_stream", None) or getattr(_current, "stream", None)


_set_socket_options = urllib3.util.connection._set_socket_options


def _register_upstream_socket(sock, options):
    """urllib3 calls this with every new socket before it connects: a Stop can then reach it before the headers."""
    # urllib3/util/connection.py create_connection(): socket(), _set_socket_options(), connect().
    stream = _stream_here()
    if stream is not None:
        stream._upstream_sock = sock
    _set_socket_options(sock, options)


urllib3.util.connection._set_socket_options = _register_upstream_socket
_request = urllib3.connection.HTTPConnection.request


def _request_on_a_kept_alive_socket(conn, *args, **kwargs):
    """urllib3 sends every request through this; a connection reused from the pool made no new socket."""
    stream = _stream_here()
    if stream is not None and conn.sock is not None:
        stream._upstream_sock = conn.sock
    return _request(conn, *args, **kwargs)


urllib3.connection.HTTPConnection.request = _request_on_a_kept_alive_socket


class _ThreadWatcher:
    """One thread per process that watches every stream's client socket and stops the streams whose client left."""

    _instance = None
    _instance_lock = threading.Lock()

    @classmethod
    def get(cls):
        """Return this process's watcher, starting it on first use (and again after a fork)."""
        with cls._instance_lock:
            if cls._instance is None or cls._instance.pid != os.getpid():
                cls._instance = cls()
            return cls._instance

    def __init__(self):
        self.pid = os.getpid()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending = []
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, name="sse-watcher", daemon=True).start()

    def add(self, sock, stream):
        """Watch `sock` until remove(); its EOF or error stops `stream`."""
        _detect_dead_peer(sock)
        self._change(("add", sock.fileno(), sock, stream))

    def remove(self, sock):
        """Stop watching `sock` (its response has ended)."""
        self._change(("remove", sock.fileno(), sock, None))

    def _change(self, change):
        # Only the watcher thread touches the selector: others queue changes and wake it.
        with self._lock:
            self._pending.append(change)
        self._wake_w.send(b"x")

    def _loop(self):
        watched = {}  # fd -> the socket registered for it now
        while True:
            try:
                self._turn(watched)
            except Exception:  # noqa: BLE001 - the watcher must outlive any one stream's oddity
                log.exception("sse watcher: unexpected error; watching on")

    def _turn(self, watched):
        for key, _ in self._selector.select():
            if key.data is None:
                self._apply_changes(watched)
                continue
            sock, stream = key.data
            if watched.get(key.fd) is not sock:
                continue  # unregistered earlier in this same turn
            try:
                gone = not _os_socket(sock).recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                gone = True
            del watched[key.fd]
            self._selector.unregister(key.fd)  # pipelined bytes keep it readable: the write path is left
            if gone:
                stream.stop("client_disconnect")

    def _apply_changes(self, watched):
        while True:
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                break
        with self._lock:
            changes, self._pending = self._pending, []
        for kind, fd, sock, stream in changes:
            if watched.get(fd) is not None and (kind == "add" or watched[fd] is sock):
                self._selector.unregister(fd)  # ended, or its fd already reused by a new one
                del watched[fd]
            if kind == "add":
                self._selector.register(fd, selectors.EVENT_READ, (sock, stream))
                watched[fd] = sock


class Quiet:
    """Call `due()` in the loop whenever `seconds` pass without a touch(); greenlets only.

    One libev timer, re-armed for the time left when it fires, instead of a gevent Timeout
    started and cancelled around every wait (a timer per event: ~15 % of the relay's CPU):
    http://pod.tst.eu/http://cvs.schmorp.de/libev/ev.pod#Be_smart_about_timeouts
    """

    def __init__(self, seconds, due):
        self.seconds, self.due = seconds, due
        self.loop = gevent.get_hub().loop
        self.touched, self.timer = self.loop.now(), None
        self._arm(seconds)

    def touch(self):
        """Start the quiet period again (something was read or written)."""
        self.touched = self.loop.now()

    def close(self):
        """Stop watching."""
        if self.timer is not None:
            self.timer.close()
            self.timer = None

    def _arm(self, after):
        if self.timer is not None:
            self.timer.close()
        self.timer = self.loop.timer(after)
        self.timer.start(self._fire)

    def _fire(self):
        left = self.seconds - (self.loop.now() - self.touched)
        if left <= 0:
            self.touched = self.loop.now()
            self.due()
            left = self.seconds
        if self.timer is not None:  # due() may have closed it
            self._arm(max(left, 0.001))


_unwinding = []  # streams whose provider has its FIN, their producers to kill once the loop is idle


def _kill_when_idle(stream):
    """Kill `stream`'s producer once the loop is idle; one greenlet waits for all stopped meanwhile."""
    # Not a greenlet per stream: spawning one, and its wait, took ~22 us of the loop per
    # stream, so when 200 clients left at once the last FIN waited ~4.5 ms more.
    _unwinding.append(stream)
    if len(_unwinding) == 1:
        gevent.spawn(_kill_unwinding)


def _kill_unwinding():
    try:
        when_idle()
    finally:  # even if this greenlet is killed, the next stop must start another
        streams, _unwinding[:] = _unwinding[:], []
    for stream in streams:
        # Unless the producer has let go of the provider already (it took the provider's
        # reply to our FIN as the Stop): a kill now would only cut its last events short.
        if getattr(getattr(stream.upstream, "raw", None), "connection", None) is not None:
            stream._kill()


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


def _send_fin(sock):
    """Shut the sending side of the provider's socket, so the provider sees the Stop now."""
    try:
        _os_socket(sock).shutdown(socket.SHUT_WR)
    except OSError:
        pass  # still connecting (Linux then aborts the connect), or gone already


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


def iter_chunks(response, ends=SSE_ENDS, waits=False):
    """Yield a streamed requests response's body as it arrives; raise TruncatedStream at a cut end.

    waits=True: yield WAIT instead of waiting for the provider, when EventStream runs these events.
    """
    # Iterating the response or SSEClient(response) reads fixed blocks and batches events.
    # A chunked body (every provider's): urllib3's own parser hands on each chunk the moment
    # it is whole (a sender knows a chunk before it sends its size), for half the CPU of read1.
    # A close-delimited body: read1 returns whatever has arrived.
    raw = response.raw
    chunks = raw.read_chunked() if raw.chunked else iter(partial(raw.read1, 65536), b"")
    producer = gevent.getcurrent()
    stream = _stream_here()
    if stream is not None:
        stream.upstream = response  # so a Stop can send the provider its FIN at once
    quiet = None
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if stream is not None and not stream._threads and sock is not None and sock.gettimeout():
        # The read timeout (requests' timeout=(connect, read)) as one timer per stream: the
        # socket's own timeout would start a gevent Timeout for every wait. urllib3 sets the
        # socket's timeout again for the connection's next request.
        def timed_out():
            if not stream._writing:  # blocked writing to a slow client is not the provider's silence
                producer.throw(socket.timeout("timed out"))

        quiet = Quiet(sock.gettimeout(), timed_out)
        sock.settimeout(None)
    # http.client reads the socket through a buffered file: raw._fp.fp (its raw: a SocketIO).
    buffered = getattr(getattr(raw, "_fp", None), "fp", None)
    reader = _ReadingWhenDrained.install(buffered)
    waits = waits and stream is not None and reader is not None
    tail = b""
    try:
        while True:
            if waits and reader.idle(buffered):
                stream._reader = reader
                yield WAIT
                thrown, stream._thrown = stream._thrown, None
                if thrown is not None:
                    raise thrown  # what interrupted EventStream's wait, as if it had come here
            chunk = next(chunks, None)
            if chunk is None:
                break
            tail = (tail + chunk)[-4:]
            yield chunk
            if quiet is not None:
                quiet.touch()  # waiting on the provider again: its silence starts now, not while we wrote
    except Exception:
        if stream is not None and stream.reason:
            raise Cancelled(stream.reason, stream.stopped_at) from None  # the provider hung up on our FIN
        raise
    finally:
        if quiet is not None:
            quiet.close()
    if stream is not None and stream.reason:
        raise Cancelled(stream.reason, stream.stopped_at)  # the provider ended the body on our FIN
    if tail and not tail.endswith(ends):
        # sseclient-py would hand the partial event on as if it were whole.
        raise TruncatedStream("upstream closed the connection in the middle of an event")


def sse_events(response, waits=False):
    """Yield the sseclient Events of a streamed text/event-stream response as they arrive (and WAIT: see iter_chunks)."""
    parser = _Parser()
    for chunk in iter_chunks(response, waits=waits):
        if chunk is WAIT:
            yield WAIT
        else:
            yield from parser.parse(chunk)


class _Parser(SSEClient):
    """sseclient-py's parser, handed the body a chunk at a time: no generator of it waits for the provider."""

    def __init__(self):
        super().__init__(None)
        self._chunk, self._data = b"", b""

    def parse(self, chunk):
        """Return an iterator of the events that `chunk` completes; an unfinished one is kept for the next chunk."""
        self._chunk = chunk
        return self.events()

    def _read(self):
        # sseclient-py's own _read, over one chunk, keeping an unfinished event across chunks
        # (a list: a generator per chunk costs more).
        chunk, self._chunk, events = self._chunk, b"", []
        for line in chunk.splitlines(True):
            self._data += line
            if self._data.endswith(SSE_ENDS):
                events.append(self._data)
                self._data = b""
        return events


class _ReadingWhenDrained(socket.SocketIO):
    """http.client's raw reader of a gevent socket, which waits for data before a read once one left the socket empty.

    gevent's recv first asks the kernel and waits only on EAGAIN. Between two events a
    stream's socket is empty, so that first call fails on every event: a system call and
    an exception for nothing, ~4,900 instructions (bench/instructions.py). A read that
    returned less than it asked for left the socket empty, so the next one waits first.
    """

    @classmethod
    def install(cls, buffered):
        """Make the raw reader under `buffered` (a file over a gevent socket) one of these; return it, or None for another socket."""
        raw = getattr(buffered, "raw", None)
        if type(raw) is cls:
            return raw
        if type(raw) is not socket.SocketIO or type(raw._sock).__name__ != "socket" or not hasattr(raw._sock, "_read_event"):
            return None  # not gevent's plain socket: TLS (its own buffer) or a thread's
        # A subclass of the same layout: SocketIO's own readinto re-checks, on every read, what
        # the buffered reader above it checks already, and then calls gevent's recv_into.
        raw.__class__ = cls
        raw._drained, raw._peeking = True, False  # drained: unknown (http.client has read the headers)
        return raw

    def readinto(self, b):
        """Read like SocketIO.readinto, waiting on gevent's own read watcher first when the last read drained the socket."""
        if self._peeking:
            return 0  # idle() looking into the buffer: read nothing
        sock = self._sock
        if self._drained and sock.timeout != 0.0:
            sock._wait(sock._read_event)  # as gevent's recv_into does after EAGAIN; honours the timeout
        try:
            n = sock._sock.recv_into(b)  # the OS socket's
        except BlockingIOError:
            n = sock.recv_into(b)  # nothing after all: gevent's waits
        self._drained = n < len(b)
        return n

    def idle(self, buffered):
        """Tell whether reading on would wait: the last read drained the socket and `buffered` holds nothing."""
        if not self._drained:
            return False
        self._peeking = True
        try:
            return not buffered.peek(0)  # with nothing buffered, peek reads once: nothing (above)
        except ValueError:
            return False  # closed: reading on ends the body
        finally:
            self._peeking = False

    def wait(self):
        """Wait until the provider sends more or hangs up."""
        self._sock._wait(self._sock._read_event)
        self._drained = False
