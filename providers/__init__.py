"""Upstream model providers. Each is one module with a `stream()` generator of text pieces.

A provider's stream(settings, messages, max_tokens, info) POSTs with post_stream(), yields
each text piece as it arrives (and sse.WAIT from sse_events(..., waits=True) while the
provider is silent, so EventStream waits for it under no generator), fills `info`
(finish_reason, usage) and returns when the provider's terminal event arrives. It raises
UpstreamError for anything else; upstream_error() below turns network and parse failures
into UpstreamError too.
"""
import socket

import requests
import urllib3

from sse import TruncatedStream
from . import anthropic, ollama, openai
from .base import UpstreamError

ADAPTERS = {"demo": openai, "openai": openai, "anthropic": anthropic, "ollama": ollama}


def _as_upstream_error(exc, settings):
    """Map a network or parse failure to an UpstreamError with a clear type."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, requests.ConnectTimeout):
        return UpstreamError("upstream_timeout", f"could not connect to the upstream within {settings.connect_timeout:g} s")
    if isinstance(exc, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError, socket.timeout)):
        return UpstreamError("upstream_timeout", f"the upstream sent nothing for {settings.read_timeout:g} s (UPSTREAM_READ_TIMEOUT)")
    cause = exc.args[0] if isinstance(exc, requests.ConnectionError) and exc.args else exc
    if isinstance(cause, (TruncatedStream, urllib3.exceptions.ProtocolError, ConnectionError)):
        return UpstreamError("upstream_disconnected", "the upstream closed the connection before finishing")
    if isinstance(exc, requests.ConnectionError):
        return UpstreamError("upstream_unreachable", f"could not connect to the upstream at {settings.base_url}")
    if isinstance(exc, (ValueError, KeyError, TypeError, AttributeError)):
        return UpstreamError("upstream_bad_response", f"the upstream sent something unreadable ({type(exc).__name__}: {exc})"[:300])
    return UpstreamError("upstream_error", f"the upstream request failed ({type(exc).__name__})")


def stream(settings, messages, max_tokens, info):
    """Return the configured provider's generator of one generation's text pieces; its failures go through upstream_error()."""
    # The adapter's own generator, not one wrapped around it to map its failures: a stream
    # keeps ~0.6 KB of C stack for each generator it waits under (README, ninth round).
    return ADAPTERS[settings.provider].stream(settings, messages, max_tokens, info)


def upstream_error(exc, settings):
    """Return the UpstreamError the client is told of for a failure while streaming from the provider."""
    error = _as_upstream_error(exc, settings)
    if settings.api_key:  # never echo the key, whatever the upstream put in its message
        error.message = error.message.replace(settings.api_key, "[redacted]")
    return error
