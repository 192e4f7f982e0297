"""Ollama's native chat API: newline-delimited JSON (https://github.com/ollama/ollama/blob/main/docs/api.md)."""
import json

from sse import WAIT, iter_chunks
from .base import UpstreamError, post_stream


def stream(settings, messages, max_tokens, info):
    """Yield message pieces of a streamed /api/chat; fill info with done_reason and token counts."""
    body = {"model": settings.model, "messages": messages, "stream": True}
    if max_tokens is not None:
        body["options"] = {"num_predict": max_tokens}
    with post_stream(settings, "/api/chat", body, {"Accept": "application/x-ndjson"}, info) as resp:
        del body  # the conversation, sent: not kept for the stream's life
        buffer = b""
        for chunk in iter_chunks(resp, ends=(b"\n",), waits=True):
            if chunk is WAIT:
                yield WAIT  # the provider is silent: EventStream waits for it (sse.WAIT)
                continue
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                data = json.loads(line)
                if "error" in data:
                    raise UpstreamError("upstream_error", f"upstream error mid-stream: {data['error']}")
                text = (data.get("message") or {}).get("content")
                if text:
                    yield text
                if data.get("done"):
                    info["finish_reason"] = data.get("done_reason")
                    info["usage"] = {"prompt_tokens": data.get("prompt_eval_count"),
                                     "completion_tokens": data.get("eval_count")}
                    return
    raise UpstreamError("upstream_ended_early", "the upstream ended the stream before its done line")
