"""TTS client: the qwen3tts-rt gRPC API (``qwen3tts_rt.v1``), nothing else.

One ``StreamSynthesize`` call per peer connection carries every reply of the call: each
reply is one named utterance (``begin`` with the reply's key, text deltas as the LLM writes
them, then ``flush``); barge-in cancels that key only. Every message the server sends back
carries the key, so replies are matched to their audio by key, with no counting. Audio is
requested as 24 kHz PCM_S16LE (the model's rate).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from agent.config import TTSConfig
from agent.errors import TTSError
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

TTS_RATE = 24000
REASONS = {v: k.lower() for k, v in pb.UtteranceDone.Reason.items()}


@dataclass(frozen=True)
class TTSAudio:
    uid: int
    pcm: bytes  # s16le mono at 24 kHz
    key: str = ""


@dataclass(frozen=True)
class TTSProgress:
    uid: int
    chars_consumed: int  # characters of the utterance's text read by the talker so far
    key: str = ""


@dataclass(frozen=True)
class TTSDone:
    uid: int
    reason: str  # eos | cap | cancelled
    frames: int
    first_packet_ms: float
    key: str = ""


TTSEvent = TTSAudio | TTSProgress | TTSDone


def rpc_error(e: grpc.RpcError) -> TTSError:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    return TTSError(f"{code.name if code else 'ERROR'}: {details}")


class TTSStream:
    """One ``StreamSynthesize`` call. ``text``/``flush``/``cancel``/``close`` return at once
    (requests are queued in order); ``events()`` yields what the server sends."""

    def __init__(
        self, stub: pb_grpc.TextToSpeechStub, config: pb.StreamConfig, metadata: list[tuple[str, str]]
    ):
        self._requests: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()
        self._requests.put_nowait(pb.StreamRequest(config=config))
        self.call = stub.StreamSynthesize(self._request_iter(), metadata=metadata)
        self.closed = False

    async def _request_iter(self) -> AsyncIterator[pb.StreamRequest]:
        while True:
            req = await self._requests.get()
            if req is None:
                return
            yield req

    def begin(self, key: str) -> None:
        """Start the utterance named ``key``: the text that follows belongs to it."""
        self._requests.put_nowait(pb.StreamRequest(begin=pb.BeginUtterance(key=key)))

    def text(self, delta: str) -> None:
        """Send a text delta of the current utterance."""
        self._requests.put_nowait(pb.StreamRequest(text=delta))

    def flush(self, client_id: str = "") -> None:
        """End the current utterance (the server speaks it to the end)."""
        self._requests.put_nowait(pb.StreamRequest(flush=pb.Flush(client_id=client_id)))

    def cancel(self, key: str | None = None) -> None:
        """Barge-in: the server stops the utterance ``key`` (every one if None) and drops its audio."""
        self._requests.put_nowait(pb.StreamRequest(cancel=pb.Cancel(key=key or "")))

    def close(self) -> None:
        """End of text: the server finishes speaking and ends the call."""
        if not self.closed:
            self.closed = True
            self._requests.put_nowait(None)

    def abort(self) -> None:
        """Drop the call now (the server frees its session at once). Safe to call twice."""
        self.closed = True
        self.call.cancel()

    async def events(self) -> AsyncIterator[TTSEvent]:
        """Audio, progress and utterance ends until the call ends; ``TTSError`` if it fails."""
        try:
            async for r in self.call:
                kind = r.WhichOneof("response")
                if kind == "audio":
                    yield TTSAudio(r.audio.utterance_id, r.audio.audio, r.audio.key)
                elif kind == "progress":
                    yield TTSProgress(r.progress.utterance_id, r.progress.chars_consumed, r.progress.key)
                elif kind == "utterance_done":
                    d = r.utterance_done
                    yield TTSDone(
                        d.utterance_id,
                        REASONS.get(d.reason, "unspecified"),
                        d.frames,
                        d.first_packet_latency_ms,
                        d.key,
                    )
        except asyncio.CancelledError:
            raise
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and self.closed:
                return
            raise rpc_error(e) from None


class TTSClient:
    """A channel to the TTS server (created on the running event loop)."""

    def __init__(self, config: TTSConfig) -> None:
        self.config = config
        if config.tls or config.tls_ca:
            root = Path(config.tls_ca).read_bytes() if config.tls_ca else None
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            self._channel = grpc.aio.secure_channel(config.address, creds)
        else:
            self._channel = grpc.aio.insecure_channel(config.address)
        self.stub = pb_grpc.TextToSpeechStub(self._channel)
        self.metadata = [("authorization", f"Bearer {config.auth_token}")] if config.auth_token else []
        self._closed = False

    @property
    def voice(self) -> str:
        c = self.config
        return c.voice_id or c.speaker or "(server default)"

    def stream_config(self) -> pb.StreamConfig:
        c = self.config
        cfg = pb.StreamConfig(
            language=c.language,
            instruct=c.instruct,
            sample_rate_hz=TTS_RATE,
            encoding=pb.PCM_S16LE,
            first_packet_frames=c.first_packet_frames,
            packet_frames=c.packet_frames,
        )
        if c.voice_id:
            cfg.voice_id = c.voice_id
        elif c.speaker:
            cfg.speaker = c.speaker
        if c.seed is not None:
            cfg.seed = c.seed
        return cfg

    def open(self) -> TTSStream:
        return TTSStream(self.stub, self.stream_config(), self.metadata)

    async def server_info(self, timeout: float = 10.0) -> pb.ServerInfo:
        try:
            return await self.stub.GetServerInfo(
                pb.GetServerInfoRequest(), metadata=self.metadata, timeout=timeout
            )
        except grpc.RpcError as e:
            raise rpc_error(e) from None

    async def close(self) -> None:
        """Safe to call twice."""
        if not self._closed:
            self._closed = True
            await self._channel.close()
