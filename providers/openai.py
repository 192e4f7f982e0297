"""OpenAI-compatible chat completions (OpenAI, vLLM, llama.cpp, Ollama's /v1, LM Studio, the demo)."""
import json

from sse import WAIT, sse_events
from .base import UpstreamError, error_message, post_stream


def stream(settings, messages, max_tokens, info):
    """Yield text pieces of a streamed chat completion; fill info with finish_reason and usage."""
    body = {"model": settings.model, "messages": messages, "stream": True,
            "stream_options": {"include_usage": True}}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    headers = {"Accept": "text/event-stream"}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    with post_stream(settings, "/chat/completions", body, headers, info) as resp:
        del body, headers  # the conversation, sent: not kept for the stream's life
        for event in sse_events(resp, waits=True):
            if event is WAIT:
                yield WAIT  # the provider is silent: EventStream waits for it (sse.WAIT)
                continue
            if event.data.strip() == "[DONE]":
                return
            yield from _pieces(event, info)
    # Some servers omit [DONE]; a finish_reason still proves the answer was whole.
    if "finish_reason" not in info:
        raise UpstreamError("upstream_ended_early", "the upstream ended the stream before its final event")


def _pieces(event, info):
    """Return the text pieces of one chunk event and note its finish_reason and usage in info."""
    # A function, so the parsed chunk is not kept while the stream waits for the next one.
    chunk = json.loads(event.data)
    if "error" in chunk or event.event == "error":
        err = chunk.get("error") if isinstance(chunk.get("error"), dict) else {}
        raise UpstreamError(err.get("type") or "upstream_error",
                            f"upstream error mid-stream: {error_message(chunk) or event.data[:300]}")
    if chunk.get("usage"):
        info["usage"] = chunk["usage"]
    pieces = []
    for choice in chunk.get("choices") or ():
        if choice.get("finish_reason"):
            info["finish_reason"] = choice["finish_reason"]
        text = (choice.get("delta") or {}).get("content")
        if text:
            pieces.append(text)
    return pieces
