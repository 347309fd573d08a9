"""First audio after the first text delta for English, Chinese with an early comma and a
40-character Chinese run, with the piece-level tokenizer and with eager tokenization, in one
run (the same server code, ``EngineConfig.eager_tokenizer`` off and on).

    python -m benchmarks.cjk_first_audio [--rounds 5] [--tokens-per-second 30] [--out DIR]

Starts the real server on a tiny CustomVoice checkpoint (loopback, free port) twice; each
text is streamed one delta per BPE token of the checkpoint's tokenizer, as an LLM would.
Writes ``cjk_first_audio.json`` and ``cjk_first_audio.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from benchmarks.load import SENTENCES, token_deltas
from qwen3tts_rt.engine.engine import EngineConfig
from qwen3tts_rt.model.fabricate import make_checkpoint
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.server.config import ServerConfig
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc

TEXTS = {
    "english": SENTENCES[0][1],
    "chinese, comma after 2 characters": SENTENCES[1][1],
    "chinese, 40-character run": SENTENCES[-1][1],
}


def first_audio_ms(
    stub: pb_grpc.TextToSpeechStub, cfg: pb.StreamConfig, deltas: list[str], rate: float
) -> float:
    sent: list[float] = []

    def requests() -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(config=cfg)
        for i, d in enumerate(deltas):
            if i:
                time.sleep(1.0 / rate)
            if not sent:
                sent.append(time.perf_counter())
            yield pb.StreamRequest(text=d)

    call = stub.StreamSynthesize(requests(), timeout=600)
    for r in call:
        if r.WhichOneof("response") == "audio":
            first = time.perf_counter()
            call.cancel()
            return (first - sent[0]) * 1000
    raise RuntimeError("no audio")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens-per-second", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    out = a.out or Path("benchmarks/results") / f"cjk-first-audio-cpu-tiny-{datetime.date.today()}"
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "tiny-custom", preset="tiny", kind="custom_voice", seed=0)
        for eager in (False, True):
            cfg = ServerConfig(
                model=str(ckpt),
                port=0,
                metrics_port=None,
                voices_dir=Path(tmp) / "voices",
                engine=EngineConfig(max_sessions=2, eager_tokenizer=eager),
                warmup=False,
            )
            srv = ServerThread(cfg).start()
            try:
                tok = srv.server.runtime.checkpoint.tokenizer  # type: ignore[union-attr]
                stream_cfg = pb.StreamConfig(
                    speaker="vivian", sampling=pb.SamplingParams(greedy=True, max_new_tokens=4)
                )
                with grpc.insecure_channel(srv.address) as ch:
                    stub = pb_grpc.TextToSpeechStub(ch)
                    first_audio_ms(stub, stream_cfg, ["Warm up."], a.tokens_per_second)
                    label = "eager" if eager else "piece-level"
                    results[label] = {}
                    for name, text in TEXTS.items():
                        deltas = token_deltas(tok, text)
                        results[label][name] = [
                            first_audio_ms(stub, stream_cfg, deltas, a.tokens_per_second)
                            for _ in range(a.rounds)
                        ]
            finally:
                srv.stop()
    med = {lab: {n: statistics.median(v) for n, v in r.items()} for lab, r in results.items()}
    doc = {
        "what": "first audio (ms) after the first text delta, one delta per BPE token",
        "tokens_per_second": a.tokens_per_second,
        "rounds": a.rounds,
        "first_audio_ms": results,
        "median_ms": med,
        "chinese_run_over_english_eager": med["eager"]["chinese, 40-character run"] / med["eager"]["english"],
        "date": str(datetime.date.today()),
    }
    (out / "cjk_first_audio.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False))
    lines = [
        f"First audio after the first delta, median of {a.rounds} (ms), {a.tokens_per_second:g} deltas/s, "
        "tiny CustomVoice, CPU",
        "",
        "| text | piece-level | eager |",
        "|---|---|---|",
    ]
    for name in TEXTS:
        lines.append(f"| {name} | {med['piece-level'][name]:.0f} | {med['eager'][name]:.0f} |")
    (out / "cjk_first_audio.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
