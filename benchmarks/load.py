"""Load generation: N asyncio gRPC clients, each streaming LLM-like text deltas at a fixed
rate into ``StreamSynthesize`` and timing what comes back.

A client's utterance is one call: the config, then the deltas paced on an absolute schedule
(delta ``i`` at ``first + i / rate``, so a slow loop does not stretch the text; ``rate`` 0:
all of them at once, as fast as the call takes them), then the half-close (end of text).
Times are ``time.perf_counter()`` of this process.
"""

from __future__ import annotations

import asyncio
import codecs
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from qwen3tts_rt.model.text_tokenizer import TextTokenizer
from qwen3tts_rt.server.client import llm_tokens
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc

# What an assistant says: short English and Chinese replies (language as the API names it).
SENTENCES: tuple[tuple[str, str], ...] = (
    ("english", "Sure! Your flight to Berlin leaves at nine forty tomorrow morning, from gate twelve."),
    ("chinese", "好的，我来帮您查一下明天上午从上海飞往北京的航班，请稍等。"),
    ("english", "The weather today is mostly sunny, with a light breeze and a high of twenty-two degrees."),
    ("chinese", "今天天气晴朗，最高气温二十二度，傍晚可能会有一点小雨。"),
    ("english", "Let me check your calendar: you have two meetings this afternoon, at two and at four."),
    ("chinese", "根据您的日程安排，下午两点和四点各有一个会议，需要我提醒您吗？"),
    # a 40-character run before the first punctuation mark (one pre-tokenizer piece)
    ("chinese", "我们今天下午在公司楼下的咖啡馆里讨论了明年新产品的设计方案和市场推广计划大家都很满意。"),
)


def token_deltas(tokenizer: TextTokenizer | None, text: str, limit: int | None = None) -> list[str]:
    """``text`` cut the way an LLM streams it: one delta per BPE token of the checkpoint's
    tokenizer (bytes held back until they form whole characters), at most ``limit`` tokens.
    Without a tokenizer (or if the pieces do not join back to ``text``): word pieces."""
    deltas: list[str] = []
    if tokenizer is not None:
        dec = codecs.getincrementaldecoder("utf-8")()
        for tid in tokenizer.encode(text):
            piece = dec.decode(tokenizer.token_bytes(tid))
            if piece:
                deltas.append(piece)
        if "".join(deltas) != text:
            deltas = []
    if not deltas:
        deltas = llm_tokens(text)
    return deltas[:limit] if limit is not None else deltas


@dataclass
class UtteranceRecord:
    client: int
    round: int
    language: str
    text: str  # what was sent (the deltas joined)
    deltas: int
    started: float = 0.0  # call opened
    first_sent: float | None = None  # first text delta written
    last_sent: float | None = None
    arrivals: list[float] = field(default_factory=list)  # non-empty audio chunks
    samples: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # each chunk's sample_offset in the utterance
    pcm: bytearray | None = None  # kept when asked (PCM_S16LE)
    done: dict[str, Any] | None = None  # the utterance_done, as a dict
    ended: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "pcm"}
        return d


async def stream_utterance(
    stub: pb_grpc.TextToSpeechStub,
    config: pb.StreamConfig,
    deltas: Sequence[str],
    rate: float,
    rec: UtteranceRecord,
    *,
    keep_pcm: bool = False,
    timeout_s: float = 1800,
) -> UtteranceRecord:
    """One StreamSynthesize call: config, the deltas at ``rate`` per second (0: all at
    once), half-close; the responses are timed into ``rec`` (with each audio chunk's length
    and ``sample_offset``: its frame range at the model's rate)."""
    if keep_pcm:
        rec.pcm = bytearray()
    rec.started = time.perf_counter()
    call = stub.StreamSynthesize(timeout=timeout_s)

    async def write() -> None:
        await call.write(pb.StreamRequest(config=config))
        t0 = time.perf_counter()
        for i, d in enumerate(deltas):
            if rate > 0:
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            await call.write(pb.StreamRequest(text=d))
            now = time.perf_counter()
            if rec.first_sent is None:
                rec.first_sent = now
            rec.last_sent = now
        await call.done_writing()

    writer = asyncio.create_task(write())
    try:
        async for resp in call:
            kind = resp.WhichOneof("response")
            if kind == "audio" and resp.audio.audio:
                rec.arrivals.append(time.perf_counter())
                rec.samples.append(len(resp.audio.audio) // 2)
                rec.offsets.append(resp.audio.sample_offset)
                if rec.pcm is not None:
                    rec.pcm.extend(resp.audio.audio)
            elif kind == "utterance_done":
                u = resp.utterance_done
                rec.done = {
                    "reason": pb.UtteranceDone.Reason.Name(u.reason).lower(),
                    "frames": u.frames,
                    "audio_seconds": u.audio_seconds,
                    "first_packet_latency_ms": u.first_packet_latency_ms,
                    "real_time_factor": u.real_time_factor,
                }
        await writer
    except grpc.RpcError as e:
        rec.error = f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
        writer.cancel()
    rec.ended = time.perf_counter()
    return rec


async def run_level(
    address: str,
    config: pb.StreamConfig,
    utterances: Sequence[Sequence[tuple[str, list[str]]]],
    rate: float,
    *,
    pause_s: float = 0.2,
    keep_pcm: bool = False,
) -> list[UtteranceRecord]:
    """``len(utterances)`` clients at once; client ``i`` speaks ``utterances[i]`` (a list
    of ``(language, deltas)``) one call after another, ``pause_s`` apart. All clients start
    together. Each client has its own channel (its own HTTP/2 connection)."""

    async def client(i: int, mine: Sequence[tuple[str, list[str]]]) -> list[UtteranceRecord]:
        out = []
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.TextToSpeechStub(channel)
            await channel.channel_ready()
            for r, (language, deltas) in enumerate(mine):
                if r:
                    await asyncio.sleep(pause_s)
                cfg = pb.StreamConfig()
                cfg.CopyFrom(config)
                cfg.language = language
                rec = UtteranceRecord(i, r, language, "".join(deltas), len(deltas))
                out.append(await stream_utterance(stub, cfg, deltas, rate, rec, keep_pcm=keep_pcm))
        return out

    per_client = await asyncio.gather(*(client(i, u) for i, u in enumerate(utterances)))
    return [rec for recs in per_client for rec in recs]
