"""First audio after the first LLM token, through each framework plugin and through that
framework's own NVIDIA/Riva class pointed at this server's Riva API: same run, same
server, same paced token stream. Plus the OpenAI endpoint's first-byte latency.

    python -m benchmarks.plugins                       # tiny CustomVoice checkpoint, CPU
    python -m benchmarks.plugins --model PATH --device cuda --dtype bfloat16 --speaker vivian

Per framework and class: ``--runs`` replies (after one untimed warm-up reply), each an
LLM-like token stream (pieces of at most 4 characters, leading spaces kept) paced at
``--tokens-per-s``. The latency of a reply is the time from queueing its first token to
the first audio frame leaving the TTS (Pipecat: the first ``TTSAudioRawFrame`` downstream;
LiveKit: the first ``SynthesizedAudio``). Classes run alternately, reply by reply. The
ratio is median(NVIDIA class) / median(plugin). Writes
``benchmarks/results/plugins-<device>-<preset>-<date>/{results.json,README.md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import re
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

from qwen3tts_rt.model.checkpoint import load_checkpoint
from qwen3tts_rt.model.fabricate import make_checkpoint
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.server.config import ServerConfig

REPLY = (
    "Sure, I can help with that. The weather today is sunny with a light breeze from the west, "
    "and it should stay warm until the evening. Do you want me to check tomorrow as well?"
)
RESULTS = Path(__file__).parent / "results"


def tokens(text: str) -> list[str]:
    out: list[str] = []
    for m in re.finditer(r"\s*\S+", text):
        w = m.group()
        out += [w[i : i + 4] for i in range(0, len(w), 4)]
    return out


async def paced(send: Callable[[str], Awaitable[None]], toks: list[str], rate: float) -> float:
    """Send ``toks`` at ``rate`` per second; returns the time the first one was sent."""
    t0 = time.perf_counter()
    for i, tok in enumerate(toks):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(tok)
    return t0


# --------------------------------------------------------------------------- Pipecat


class _PipecatBot:
    def __init__(self, service: Any, rate: int) -> None:
        from pipecat.frames.frames import Frame, LLMFullResponseEndFrame, TTSAudioRawFrame
        from pipecat.pipeline.pipeline import Pipeline
        from pipecat.pipeline.runner import PipelineRunner
        from pipecat.pipeline.task import PipelineParams, PipelineTask
        from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

        bot = self
        self.first_audio: float | None = None
        self.ended = asyncio.Event()

        class Probe(FrameProcessor):
            async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
                await super().process_frame(frame, direction)
                if isinstance(frame, TTSAudioRawFrame) and bot.first_audio is None:
                    bot.first_audio = time.perf_counter()
                elif isinstance(frame, LLMFullResponseEndFrame):
                    bot.ended.set()
                await self.push_frame(frame, direction)

        self.task = PipelineTask(
            Pipeline([service, Probe()]),
            params=PipelineParams(audio_out_sample_rate=rate),
            idle_timeout_secs=None,
        )
        self.runner = asyncio.create_task(PipelineRunner(handle_sigint=False).run(self.task))

    async def reply(self, toks: list[str], rate: float) -> float:
        from pipecat.frames.frames import LLMFullResponseEndFrame, LLMFullResponseStartFrame, LLMTextFrame

        self.first_audio = None
        self.ended.clear()
        await self.task.queue_frame(LLMFullResponseStartFrame())

        async def send(tok: str) -> None:
            await self.task.queue_frame(LLMTextFrame(tok))

        t0 = await paced(send, toks, rate)
        await self.task.queue_frame(LLMFullResponseEndFrame())
        await asyncio.wait_for(self.ended.wait(), 300)
        if self.first_audio is None:
            raise RuntimeError("no audio")
        return self.first_audio - t0

    async def close(self) -> None:
        from pipecat.frames.frames import EndFrame

        await self.task.queue_frame(EndFrame())
        await asyncio.wait_for(self.runner, 60)


def pipecat_classes(address: str, speaker: str) -> dict[str, Callable[[], Any]]:
    from pipecat.services.nvidia.tts import NvidiaTTSService, NvidiaTTSSynthesisMode

    from qwen3tts_rt.integrations.pipecat import Qwen3TTSService

    def nvidia(mode: Any) -> Callable[[], Any]:
        return lambda: NvidiaTTSService(
            server=address,
            use_ssl=False,
            settings=NvidiaTTSService.Settings(
                voice=f"Qwen3-TTS.{speaker}", language="en-US", synthesis_mode=mode
            ),
        )

    return {
        "qwen3tts_rt.integrations.pipecat.Qwen3TTSService": lambda: Qwen3TTSService(
            address=address, settings=Qwen3TTSService.Settings(voice=speaker, language="en")
        ),
        "pipecat NvidiaTTSService (per_sentence, default)": nvidia(NvidiaTTSSynthesisMode.PER_SENTENCE),
        "pipecat NvidiaTTSService (stitched)": nvidia(NvidiaTTSSynthesisMode.STITCHED),
    }


# --------------------------------------------------------------------------- LiveKit


async def livekit_reply(tts: Any, toks: list[str], rate: float) -> float:
    stream = tts.stream()
    first: list[float] = []

    async def read() -> None:
        async for _ in stream:
            if not first:
                first.append(time.perf_counter())

    reader = asyncio.create_task(read())

    async def send(tok: str) -> None:
        stream.push_text(tok)

    t0 = await paced(send, toks, rate)
    stream.end_input()
    await asyncio.wait_for(reader, 300)
    await stream.aclose()
    if not first:
        raise RuntimeError("no audio")
    return first[0] - t0


def livekit_classes(address: str, speaker: str) -> dict[str, Callable[[], Any]]:
    from livekit.plugins import nvidia

    from qwen3tts_rt.integrations import livekit as qwen3tts

    return {
        "qwen3tts_rt.integrations.livekit.TTS": lambda: qwen3tts.TTS(
            address=address, voice=speaker, language="en"
        ),
        "livekit.plugins.nvidia.TTS": lambda: nvidia.TTS(
            server=address, use_ssl=False, voice=f"Qwen3-TTS.{speaker}", language_code="en-US"
        ),
    }


# --------------------------------------------------------------------------- OpenAI


def openai_first_byte(port: int, speaker: str, text: str) -> float:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    t0 = time.perf_counter()
    with client.audio.speech.with_streaming_response.create(
        model="qwen3-tts", voice=speaker, input=text, response_format="pcm"
    ) as resp:
        first = 0.0
        for chunk in resp.iter_bytes():
            if chunk and not first:
                first = time.perf_counter() - t0
    return first


# --------------------------------------------------------------------------- run


async def bench(server: ServerThread, speaker: str, args: argparse.Namespace) -> dict[str, Any]:
    toks = tokens(REPLY)
    out: dict[str, Any] = {"latency_s": {}, "ratio": {}}

    # Pipecat
    classes = pipecat_classes(server.address, speaker)
    bots = {name: _PipecatBot(make(), 24000) for name, make in classes.items()}
    samples: dict[str, list[float]] = {name: [] for name in bots}
    for bot in bots.values():
        await bot.reply(toks, args.tokens_per_s)  # warm-up
    for _ in range(args.runs):
        for name, bot in bots.items():
            samples[name].append(await bot.reply(toks, args.tokens_per_s))
    for bot in bots.values():
        await bot.close()
    out["latency_s"]["pipecat"] = samples

    # LiveKit
    lk = {name: make() for name, make in livekit_classes(server.address, speaker).items()}
    lk_samples: dict[str, list[float]] = {name: [] for name in lk}
    for tts in lk.values():
        await livekit_reply(tts, toks, args.tokens_per_s)  # warm-up
    for _ in range(args.runs):
        for name, tts in lk.items():
            lk_samples[name].append(await livekit_reply(tts, toks, args.tokens_per_s))
    for tts in lk.values():
        await tts.aclose()
    out["latency_s"]["livekit"] = lk_samples

    # OpenAI endpoint: the whole text in one request
    port = server.openai_port
    assert port is not None
    await asyncio.to_thread(openai_first_byte, port, speaker, REPLY)  # warm-up
    out["latency_s"]["openai_first_byte"] = [
        await asyncio.to_thread(openai_first_byte, port, speaker, REPLY) for _ in range(args.runs)
    ]

    med = {
        fw: {n: statistics.median(v) for n, v in d.items()}
        for fw, d in out["latency_s"].items()
        if isinstance(d, dict)
    }
    out["median_s"] = med
    ours_pc = med["pipecat"]["qwen3tts_rt.integrations.pipecat.Qwen3TTSService"]
    ours_lk = med["livekit"]["qwen3tts_rt.integrations.livekit.TTS"]
    out["ratio"] = {
        "pipecat NvidiaTTSService (per_sentence) / plugin": med["pipecat"][
            "pipecat NvidiaTTSService (per_sentence, default)"
        ]
        / ours_pc,
        "pipecat NvidiaTTSService (stitched) / plugin": med["pipecat"]["pipecat NvidiaTTSService (stitched)"]
        / ours_pc,
        "livekit nvidia.TTS / plugin": med["livekit"]["livekit.plugins.nvidia.TTS"] / ours_lk,
    }
    out["openai_first_byte_median_s"] = statistics.median(out["latency_s"]["openai_first_byte"])
    return out


def report(res: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# First audio after the first LLM token: plugins vs the frameworks' NVIDIA/Riva classes",
        "",
        f"{meta['date']}, {meta['device']}, checkpoint `{meta['model']}`, torch threads {meta['threads']}; "
        f"{meta['runs']} replies per class after one warm-up, {meta['tokens']} tokens at "
        f"{meta['tokens_per_s']} tokens/s, same server and run (`python -m benchmarks.plugins`).",
        "",
        "| framework | class | median (ms) | runs (ms) |",
        "| --- | --- | ---: | --- |",
    ]
    for fw in ("pipecat", "livekit"):
        for name, vals in res["latency_s"][fw].items():
            runs = ", ".join(f"{v * 1000:.0f}" for v in vals)
            lines.append(f"| {fw} | {name} | {res['median_s'][fw][name] * 1000:.0f} | {runs} |")
    ob = res["latency_s"]["openai_first_byte"]
    lines.append(
        f"| OpenAI endpoint | first byte of `/v1/audio/speech` (pcm, whole text) | "
        f"{res['openai_first_byte_median_s'] * 1000:.0f} | {', '.join(f'{v * 1000:.0f}' for v in ob)} |"
    )
    lines += ["", "Ratios (median / median, higher = the plugin is faster):", ""]
    lines += [f"* {k}: **{v:.1f}x**" for k, v in res["ratio"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: a tiny CustomVoice one, built here)")
    p.add_argument("--speaker", help="built-in speaker (default: the checkpoint's first)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tokens-per-s", type=float, default=30.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/plugins-...)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        from loguru import logger as _loguru

        _loguru.remove()  # Pipecat's per-frame debug lines would swamp the output
        _loguru.add(lambda m: print(m, end=""), level="WARNING")
    except ImportError:
        pass
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(
            make_checkpoint(Path(tmp) / "tiny-custom", preset="tiny", kind="custom_voice")
        )
        ckpt = load_checkpoint(model, device=args.device, dtype=args.dtype)
        speaker = args.speaker or str(ckpt.config.speakers[0])
        cfg = ServerConfig(
            model=model, port=0, metrics_port=None, openai_port=0, voices_dir=Path(tmp) / "voices",
            device=args.device, dtype=args.dtype,
        )  # fmt: skip
        srv = ServerThread(cfg, ckpt).start()
        try:
            res = asyncio.run(bench(srv, speaker, args))
        finally:
            srv.stop()
    date = datetime.date.today().isoformat()
    preset = "tiny" if not args.model else Path(args.model).name
    meta = {
        "date": date,
        "device": args.device if args.device != "cpu" else f"cpu ({args.threads} torch thread(s))",
        "model": preset,
        "threads": args.threads,
        "runs": args.runs,
        "tokens": len(tokens(REPLY)),
        "tokens_per_s": args.tokens_per_s,
        "reply": REPLY,
    }
    out = args.out or RESULTS / f"plugins-{args.device.split(':')[0]}-{preset}-{date}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, **res}, indent=2))
    text = report(res, meta)
    (out / "README.md").write_text(text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
