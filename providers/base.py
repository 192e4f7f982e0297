"""What every provider adapter shares: the HTTP pool, the POST, the error type."""
import http.client
import json
import os

import requests

# One pool per worker: a finished stream's connection is reused; a cancelled one is closed.
# As large as gunicorn's worker_connections (a worker holds at most that many streams): past
# its size urllib3 logs a warning for every connection it hands back, ~0.1 ms of the event
# loop each when many streams end at once.
POOL_SIZE = int(os.environ.get("WORKER_CONNECTIONS") or 1000)
READ_BUFFER = 1024


class _Response(http.client.HTTPResponse):
    """http.client's response, reading its socket through a 1 KB buffer instead of 8 KB.

    A stream holds its buffer as long as it is open (1,000 streams: 7 MB more at 8 KB). An
    event is a few hundred bytes; a read larger than the buffer bypasses it anyway.
    """

    def __init__(self, sock, *args, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # http.client's own, made with the default size (closes the file, not the socket)
        self.fp = sock.makefile("rb", buffering=READ_BUFFER)


def _reading_through_small_buffers(pool):
    """Return a subclass of the urllib3 pool class `pool` whose connections make _Response."""
    # urllib3 reads a response through http.client, which makes it with the connection's response_class.
    connection = type(pool.ConnectionCls.__name__, (pool.ConnectionCls,), {"response_class": _Response})
    return type(pool.__name__, (pool,), {"ConnectionCls": connection})


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose pools read through small buffers: only this session's responses change."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            scheme: _reading_through_small_buffers(pool) for scheme, pool in self.poolmanager.pool_classes_by_scheme.items()}


http = requests.Session()
http.mount("http://", _Adapter(pool_maxsize=POOL_SIZE))
http.mount("https://", _Adapter(pool_maxsize=POOL_SIZE))

ERROR_TYPES = {400: "invalid_request", 401: "authentication_error", 403: "permission_error",
               404: "not_found", 408: "upstream_timeout", 413: "invalid_request",
               429: "rate_limited", 503: "upstream_overloaded", 529: "upstream_overloaded"}


class UpstreamError(Exception):
    """The upstream failed; `type` and `message` go to the client in the error event."""

    def __init__(self, type, message, status=None, retry_after=None):
        super().__init__(message)
        self.type, self.message, self.status, self.retry_after = type, message, status, retry_after

    def event_data(self):
        """Return the data of the `error` event for this failure."""
        data = {"status": "error", "type": self.type, "message": self.message}
        if self.status is not None:
            data["upstream_status"] = self.status
        if self.retry_after is not None:
            data["retry_after"] = self.retry_after
        return data


def error_message(body):
    """Return the human message inside a provider's error JSON, or None."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return err.get("message") or err.get("detail")
        if isinstance(err, str):
            return err
    return None


def post_stream(settings, path, body, headers, info):
    """POST a streaming request; return the response, or raise UpstreamError for a non-2xx."""
    resp = http.post(
        settings.base_url + path,
        json=body,
        # identity: a compressed stream is buffered by the decoder and delays events.
        headers={"Accept-Encoding": "identity", **headers},
        stream=True,
        timeout=(settings.connect_timeout, settings.read_timeout),
    )
    info["request_id"] = resp.headers.get("x-request-id") or resp.headers.get("request-id")
    if resp.status_code < 400:
        # A stream may stay open for minutes: keep only what reading the body needs, not the
        # request that was sent (the whole conversation), its headers and the cookie jar.
        resp.request = resp.cookies = resp.connection = None
        # The headers are parsed three times over (http.client, urllib3, requests): one copy,
        # urllib3's, which reads the body by it, is enough.
        resp.headers = resp.raw.headers
        original = getattr(resp.raw, "_original_response", None)
        if original is not None:
            original.headers = original.msg = None
        return resp
    with resp:
        conn = resp.raw.connection
        raw = resp.raw.read(64 * 1024, decode_content=True)
        if conn is not None:
            conn.close()  # a fully read body would return it to the pool; a failed call ends here
    try:
        message = error_message(json.loads(raw))
    except ValueError:
        message = None
    message = message or raw.decode("utf-8", "replace").strip()[:500] or resp.reason
    raise UpstreamError(
        ERROR_TYPES.get(resp.status_code, "upstream_server_error" if resp.status_code >= 500 else "upstream_error"),
        f"upstream answered {resp.status_code}: {message}",
        status=resp.status_code,
        retry_after=resp.headers.get("retry-after"),
    )
