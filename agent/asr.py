"""ASR adapter: an OpenAI-compatible ``/v1/audio/transcriptions`` endpoint (faster-whisper
servers, vLLM, whisper.cpp's server, OpenAI). The turn's 16 kHz audio goes up as a WAV file."""

from __future__ import annotations

import io
import json
import wave

import aiohttp

from agent.config import ASRConfig
from agent.errors import ASRError
from agent.llm import auth_headers, endpoint, error_text


def wav_bytes(pcm: bytes, rate: int = 16000) -> bytes:
    """s16le mono PCM -> a WAV file."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


class ASRClient:
    def __init__(self, config: ASRConfig, session: aiohttp.ClientSession) -> None:
        if not config.url:
            raise ValueError("ASRClient needs a URL")
        self.config = config
        self.url = endpoint(config.url, "/audio/transcriptions")
        self._session = session

    async def transcribe(self, pcm16k: bytes) -> str:
        c = self.config
        form = aiohttp.FormData()
        form.add_field("file", wav_bytes(pcm16k), filename="turn.wav", content_type="audio/wav")
        form.add_field("model", c.model)
        form.add_field("response_format", "json")
        if c.language:
            form.add_field("language", c.language)
        try:
            async with self._session.post(
                self.url,
                data=form,
                headers=auth_headers(c.api_key),
                timeout=aiohttp.ClientTimeout(total=c.timeout_s),
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise ASRError(f"{self.url} answered {resp.status}: {error_text(body)}")
        except aiohttp.ClientError as e:
            raise ASRError(f"{self.url}: {type(e).__name__}: {e}") from e
        except TimeoutError as e:
            raise ASRError(f"{self.url}: no answer in {c.timeout_s:.0f} s") from e
        try:
            text = json.loads(body)["text"]
        except (ValueError, KeyError, TypeError):
            raise ASRError(f"{self.url}: answer has no 'text': {body[:200]!r}") from None
        if not isinstance(text, str):
            raise ASRError(f"{self.url}: 'text' is not a string")
        return text.strip()
