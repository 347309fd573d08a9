"""LLM adapter: an OpenAI-compatible ``/v1/chat/completions`` endpoint with ``stream=true``
(vLLM, llama.cpp's server, Ollama, OpenAI). Tokens are yielded as their server-sent
events arrive; cancelling the consuming task closes the HTTP request."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp

from agent.config import LLMConfig
from agent.errors import LLMError

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1024 * 1024  # one server-sent event line


def endpoint(url: str, path: str) -> str:
    """``http://host/v1`` + ``/chat/completions``; a URL that already ends with the path is kept."""
    url = url.rstrip("/")
    return url if url.endswith(path) else url + path


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def error_text(body: bytes) -> str:
    text = body[:500].decode("utf-8", "replace").strip()
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except (ValueError, AttributeError):
        pass
    return text


class LLMClient:
    def __init__(self, config: LLMConfig, session: aiohttp.ClientSession) -> None:
        if not config.url:
            raise ValueError("LLMClient needs a URL")
        self.config = config
        self.url = endpoint(config.url, "/chat/completions")
        self._session = session

    def request_body(self, messages: Sequence[dict[str, str]]) -> dict[str, Any]:
        c = self.config
        body: dict[str, Any] = {"model": c.model, "messages": list(messages), "stream": True}
        if c.temperature is not None:
            body["temperature"] = c.temperature
        if c.max_tokens is not None:
            body["max_tokens"] = c.max_tokens
        return body

    async def stream(self, messages: Sequence[dict[str, str]]) -> AsyncIterator[str]:
        """The reply's text deltas, as the server streams them (empty deltas skipped;
        ``<think>`` sections of reasoning models dropped unless ``strip_think`` is off)."""
        c = self.config
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=c.connect_timeout_s, sock_read=c.read_timeout_s
        )
        try:
            async with self._session.post(
                self.url,
                json=self.request_body(messages),
                headers={**auth_headers(c.api_key), "Accept": "text/event-stream"},
                timeout=timeout,
            ) as resp:
                if resp.status != 200:
                    raise LLMError(f"{self.url} answered {resp.status}: {error_text(await resp.read())}")
                think = ThinkFilter() if c.strip_think else None
                async for delta in _sse_deltas(resp):
                    if think is not None:
                        delta = think.push(delta)
                    if delta:
                        yield delta
                if think is not None and (rest := think.flush()):
                    yield rest
        except aiohttp.ClientError as e:
            raise LLMError(f"{self.url}: {type(e).__name__}: {e}") from e
        except TimeoutError as e:
            raise LLMError(f"{self.url}: no data for {c.read_timeout_s:.0f} s") from e


async def _sse_deltas(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """``data: {json}`` lines of a chat-completions stream -> ``choices[0].delta.content``."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        if len(buf) > MAX_LINE_BYTES and b"\n" not in buf:
            raise LLMError(f"server-sent event line longer than {MAX_LINE_BYTES} bytes")
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # comments (": keep-alive"), event:/id: fields, blank separators
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            try:
                event = json.loads(data)
            except ValueError:
                raise LLMError(f"bad server-sent event: {data[:200]!r}") from None
            if isinstance(event, dict) and event.get("error"):
                raise LLMError(f"stream error: {event['error']}")
            delta = _content(event)
            if delta:
                yield delta


def _content(event: Any) -> str:
    try:
        choice = event["choices"][0]
    except (KeyError, IndexError, TypeError):
        return ""
    delta = choice.get("delta") or {}
    content = delta.get("content")
    if content is None and "text" in choice:  # completions-style chunks (some servers)
        content = choice["text"]
    return content if isinstance(content, str) else ""


class ThinkFilter:
    """Drops ``<think>...</think>`` sections from a stream of deltas (Qwen3, DeepSeek-R1 and
    other reasoning models served without a reasoning parser write them into ``content``):
    nobody wants to hear the agent think. Tags split across deltas are handled."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self) -> None:
        self._buf = ""
        self._inside = False

    def push(self, delta: str) -> str:
        self._buf += delta
        out: list[str] = []
        while True:
            tag = self.CLOSE if self._inside else self.OPEN
            i = self._buf.find(tag)
            if i >= 0:
                if not self._inside:
                    out.append(self._buf[:i])
                self._buf = self._buf[i + len(tag) :]
                self._inside = not self._inside
                continue
            # hold back a tail that may be the start of the tag
            keep = next(
                (
                    k
                    for k in range(min(len(tag) - 1, len(self._buf)), 0, -1)
                    if tag.startswith(self._buf[-k:])
                ),
                0,
            )
            cut = len(self._buf) - keep
            if not self._inside:
                out.append(self._buf[:cut])
            self._buf = self._buf[cut:]
            return "".join(out)

    def flush(self) -> str:
        """The end of the stream: what was held back (unless inside a section)."""
        rest = "" if self._inside else self._buf
        self._buf = ""
        return rest
