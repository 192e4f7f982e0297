"""Anthropic's Messages API, streamed (https://docs.anthropic.com/en/api/messages-streaming)."""
import json

from sse import WAIT, sse_events
from .base import UpstreamError, post_stream

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096  # the Messages API requires max_tokens


def stream(settings, messages, max_tokens, info):
    """Yield text deltas of a streamed message; fill info with stop reason and usage."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    body = {"model": settings.model, "stream": True, "max_tokens": max_tokens or DEFAULT_MAX_TOKENS,
            "messages": [m for m in messages if m["role"] != "system"]}
    if system:
        body["system"] = system
    headers = {"Accept": "text/event-stream", "x-api-key": settings.api_key,
               "anthropic-version": API_VERSION}
    usage = {}
    with post_stream(settings, "/v1/messages", body, headers, info) as resp:
        del body, headers  # the conversation, sent: not kept for the stream's life
        for event in sse_events(resp, waits=True):
            if event is WAIT:
                yield WAIT  # the provider is silent: EventStream waits for it (sse.WAIT)
                continue
            data = json.loads(event.data)
            kind = event.event if event.event != "message" else data.get("type")
            if kind == "content_block_delta" and data["delta"].get("type") == "text_delta":
                yield data["delta"]["text"]
            elif kind == "message_start":
                usage.update(data["message"].get("usage") or {})
                # Known from the start: a stopped message still has its input count.
                info["input_tokens"] = usage.get("input_tokens")
            elif kind == "message_delta":
                usage.update(data.get("usage") or {})
                info["finish_reason"] = data["delta"].get("stop_reason")
            elif kind == "message_stop":
                info["usage"] = usage or None
                return
            elif kind == "error":
                err = data.get("error") or {}
                raise UpstreamError(err.get("type") or "upstream_error",
                                    f"upstream error mid-stream: {err.get('message') or event.data[:300]}")
            # ping, content_block_start/stop and event types added later are ignored.
    raise UpstreamError("upstream_ended_early", "the upstream ended the stream before message_stop")
