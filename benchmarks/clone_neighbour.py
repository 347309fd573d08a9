"""First packet of a stored-voice stream while ten long clonings run, side by side with
the same stream on an idle server (one run, one ratio).

    python -m benchmarks.clone_neighbour [--clonings 10] [--seconds 60] [--out DIR]

Starts the real server on a tiny Base checkpoint (loopback, free port), stores one voice,
then measures the stream's first packet (first text sent -> first audio received) alone,
and again while ``--clonings`` CreateVoice calls with ``--seconds`` of reference audio each
are in flight. Writes ``clone_neighbour.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import tempfile
import threading
import time
from pathlib import Path

import grpc

from qwen3tts_rt.audio import write_wav
from qwen3tts_rt.engine.engine import EngineConfig
from qwen3tts_rt.model.fabricate import make_checkpoint
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.server.config import ServerConfig
from qwen3tts_rt.synthetic import synthetic_speech
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc


def wav_bytes(seconds: float, seed: int) -> bytes:
    buf = io.BytesIO()
    write_wav(buf, synthetic_speech(seconds, seed=seed), 24000)
    return buf.getvalue()


def first_packet_ms(stub: pb_grpc.TextToSpeechStub, voice_id: str) -> float:
    cfg = pb.StreamConfig(
        voice_id=voice_id, language="english", sampling=pb.SamplingParams(greedy=True, max_new_tokens=8)
    )
    sent: list[float] = []

    def requests():  # type: ignore[no-untyped-def]
        yield pb.StreamRequest(config=cfg)
        sent.append(time.perf_counter())
        yield pb.StreamRequest(text="Hello there.")

    first = None
    for r in stub.StreamSynthesize(requests(), timeout=600):
        if r.WhichOneof("response") == "audio" and first is None:
            first = time.perf_counter()
    assert first is not None
    return (first - sent[0]) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clonings", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    out = a.out or Path("benchmarks/results") / f"clone-neighbour-cpu-tiny-{datetime.date.today()}"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "tiny-base", preset="tiny", kind="base", seed=0)
        cfg = ServerConfig(
            model=str(ckpt),
            port=0,
            metrics_port=None,
            voices_dir=Path(tmp) / "voices",
            engine=EngineConfig(max_sessions=4),
            max_voice_jobs=a.clonings + 1,
            warmup=False,
        )
        srv = ServerThread(cfg).start()
        try:
            with grpc.insecure_channel(srv.address) as ch:
                stub = pb_grpc.TextToSpeechStub(ch)
                voice = stub.CreateVoice(
                    pb.CreateVoiceRequest(ref_audio=wav_bytes(1.5, 0), x_vector_only=True, display_name="v")
                ).voice_id
                first_packet_ms(stub, voice)  # warm-up (lazy initialisation), not counted
                idle = [first_packet_ms(stub, voice) for _ in range(a.repeats)]
                audio = [wav_bytes(a.seconds, k + 1) for k in range(a.clonings)]
                done: list[float] = []
                t0 = time.perf_counter()

                def clone(k: int) -> None:
                    stub.CreateVoice(
                        pb.CreateVoiceRequest(ref_audio=audio[k], x_vector_only=True, display_name=f"c{k}"),
                        timeout=600,
                    )
                    done.append(time.perf_counter() - t0)

                threads = [threading.Thread(target=clone, args=(k,)) for k in range(a.clonings)]
                for t in threads:
                    t.start()
                busy = [first_packet_ms(stub, voice) for _ in range(a.repeats)]
                busy_at = time.perf_counter() - t0
                for t in threads:
                    t.join()
        finally:
            srv.stop()
    result = {
        "what": "first packet (ms) of a stored-voice stream, idle server vs during clonings",
        "clonings": a.clonings,
        "reference_seconds": a.seconds,
        "first_packet_ms_idle": idle,
        "first_packet_ms_during_clonings": busy,
        "ratio_median": sorted(busy)[len(busy) // 2] / sorted(idle)[len(idle) // 2],
        "streams_done_at_s": busy_at,
        "clonings_done_at_s": sorted(done),
        "date": str(datetime.date.today()),
    }
    (out / "clone_neighbour.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
