"""A small synchronous client of the qwen3tts-rt API (the ``say`` and ``voice`` commands).

``say`` streams its text in token-sized deltas at a fixed rate, the way an LLM writes,
and measures what a voice assistant would feel: first audio after the first token.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc

REASON_NAMES = {v: k.lower() for k, v in pb.UtteranceDone.Reason.items()}


def connect(addr: str, *, tls_ca: str | None = None, tls: bool = False) -> grpc.Channel:
    if tls or tls_ca:
        root = Path(tls_ca).read_bytes() if tls_ca else None
        return grpc.secure_channel(addr, grpc.ssl_channel_credentials(root_certificates=root))
    return grpc.insecure_channel(addr)


def auth_metadata(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def llm_tokens(text: str, max_chars: int = 5) -> list[str]:
    """Split text into deltas shaped like LLM tokens: words with their leading space,
    long words cut into pieces of at most ``max_chars``. Joined, they give ``text``."""
    out: list[str] = []
    for m in re.finditer(r"\s*\S+|\s+", text):
        piece = m.group(0)
        lead = len(piece) - len(piece.lstrip())
        head, word = piece[:lead], piece[lead:]
        chunks = [word[i : i + max_chars] for i in range(0, len(word), max_chars)] or [""]
        chunks[0] = head + chunks[0]
        out.extend(chunks)
    return out


@dataclass
class SayResult:
    pcm: np.ndarray  # int16 at ``sample_rate``
    sample_rate: int
    first_token_to_first_audio_s: float | None  # client side
    stream_to_first_audio_s: float | None
    total_s: float
    utterances: list[pb.UtteranceDone] = field(default_factory=list)

    @property
    def audio_seconds(self) -> float:
        return len(self.pcm) / self.sample_rate


def say(
    stub: pb_grpc.TextToSpeechStub,
    config: pb.StreamConfig,
    text: str,
    *,
    tokens_per_second: float = 20.0,
    metadata: list[tuple[str, str]] | None = None,
    timeout: float | None = None,
    more: list[tuple[pb.UtteranceOptions, str]] | None = None,
) -> SayResult:
    """Stream ``text`` token by token on one StreamSynthesize call; PCM_S16LE output.
    ``more``: further utterances on the same stream, each with its own options (voice,
    language, ...); they are named ``u1``, ``u2``, ... (the first one ``u0``)."""
    config = pb.StreamConfig.FromString(config.SerializeToString())
    config.encoding = pb.PCM_S16LE
    rate = config.sample_rate_hz or 24000
    parts = [(pb.UtteranceOptions(), text), *(more or [])]
    interval = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0
    first_sent: list[float] = []

    def requests() -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(config=config)
        for k, (options, part) in enumerate(parts):
            yield pb.StreamRequest(begin=pb.BeginUtterance(key=f"u{k}", options=options))
            for i, tok in enumerate(llm_tokens(part)):
                if (i or k) and interval:
                    time.sleep(interval)
                if not first_sent:
                    first_sent.append(time.perf_counter())
                yield pb.StreamRequest(text=tok)

    started = time.perf_counter()
    chunks: list[bytes] = []
    first_audio: float | None = None
    dones: list[pb.UtteranceDone] = []
    for resp in stub.StreamSynthesize(requests(), metadata=metadata, timeout=timeout):
        kind = resp.WhichOneof("response")
        if kind == "audio":
            if first_audio is None:
                first_audio = time.perf_counter()
            chunks.append(resp.audio.audio)
        elif kind == "utterance_done":
            dones.append(resp.utterance_done)
    total = time.perf_counter() - started
    pcm = np.frombuffer(b"".join(chunks), dtype="<i2").astype(np.int16)
    return SayResult(
        pcm=pcm,
        sample_rate=rate,
        first_token_to_first_audio_s=(first_audio - first_sent[0]) if first_audio and first_sent else None,
        stream_to_first_audio_s=(first_audio - started) if first_audio else None,
        total_s=total,
        utterances=dones,
    )


def format_say(result: SayResult, out: str) -> str:
    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x * 1000:.0f} ms"

    lines = [
        f"{out}: {result.audio_seconds:.2f} s of audio at {result.sample_rate} Hz in {result.total_s:.2f} s",
        f"first-packet latency (first token sent -> first audio received): {ms(result.first_token_to_first_audio_s)}",
        f"time to first audio (stream start): {ms(result.stream_to_first_audio_s)}",
    ]
    for d in result.utterances:
        lines.append(
            f"utterance {d.utterance_id} ({d.key or 'no key'}): {REASON_NAMES.get(d.reason, '?')}, {d.frames} frames, "
            f"{d.audio_seconds:.2f} s; server first-packet latency {d.first_packet_latency_ms:.0f} ms, "
            f"RTF {d.real_time_factor:.3f}"
        )
    return "\n".join(lines)
