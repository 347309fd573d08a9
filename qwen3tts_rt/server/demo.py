"""``make demo``: the whole serving path, offline, on a tiny random-weight checkpoint.

Starts ``qwen3tts-rt serve`` in a child process, clones a voice from a synthetic
reference recording with ``qwen3tts-rt voice create``, streams a sentence into the
server token by token with ``qwen3tts-rt say`` (as an LLM would), writes the WAV, and
prints the latency summary from the server's ``/metrics``. Random weights speak noise,
not words: the demo shows the plumbing and the timings.
"""

from __future__ import annotations

import argparse
import io
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from qwen3tts_rt.audio import write_wav
from qwen3tts_rt.synthetic import synthetic_speech

TEXT = "Hello! This is Qwen3-TTS speaking in real time, while the language model is still writing."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reference_wav(seconds: float = 3.0, rate: int = 24000) -> bytes:
    buf = io.BytesIO()
    write_wav(buf, synthetic_speech(seconds, rate), rate)
    return buf.getvalue()


def _run(args: list[str]) -> str:
    shown = "qwen3tts-rt " + " ".join(shlex.quote(a) for a in args)
    print(f"$ {shown}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "qwen3tts_rt.cli", *args], capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode:
        raise SystemExit(f"demo: `{shown}` failed ({proc.returncode})")
    return proc.stdout


def _quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Quantile from cumulative histogram buckets [(upper bound, count)] (linear within a bucket)."""
    total = buckets[-1][1]
    if total == 0:
        return float("nan")
    rank = q * total
    lo_bound, lo_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lo_bound
            frac = (rank - lo_count) / max(count - lo_count, 1e-12)
            return lo_bound + (bound - lo_bound) * frac
        lo_bound, lo_count = bound, count
    return lo_bound


def latency_summary(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    lines = ["server metrics (/metrics):"]
    for name, label, unit in (
        (
            "qwen3tts_first_packet_latency_seconds",
            "first-packet latency (first text in -> first audio out)",
            1000,
        ),
        ("qwen3tts_time_to_first_audio_seconds", "time to first audio (stream start)", 1000),
        ("qwen3tts_inter_packet_gap_seconds", "inter-packet gap", 1000),
        ("qwen3tts_queue_wait_seconds", "output queue wait", 1000),
        ("qwen3tts_real_time_factor", "real-time factor", 1),
    ):
        fam = families.get(name)
        if fam is None:
            continue
        buckets = sorted(
            (float(s.labels["le"]), s.value)
            for s in fam.samples
            if s.name.endswith("_bucket") and s.labels.get("api") == "tts"
        )
        if not buckets or buckets[-1][1] == 0:
            continue
        p50, p90 = _quantile(buckets, 0.5), _quantile(buckets, 0.9)
        suffix = " ms" if unit == 1000 else ""
        lines.append(
            f"  {label:<58} p50 {p50 * unit:8.1f}{suffix}  p90 {p90 * unit:8.1f}{suffix}  (n={buckets[-1][1]:.0f})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--checkpoint", default="checkpoints/tiny-base")
    ap.add_argument("--out", default="out/demo.wav")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--tokens-per-second", type=float, default=20.0)
    a = ap.parse_args(argv)

    ckpt = Path(a.checkpoint)
    if not (ckpt / "config.json").is_file():
        _run(["make-checkpoint", "--preset", "tiny", "--kind", "base", "--out", str(ckpt)])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    port, metrics_port = _free_port(), _free_port()
    addr = f"127.0.0.1:{port}"
    serve_args = [
        "serve", "--model", str(ckpt), "--port", str(port), "--metrics-port", str(metrics_port),
        "--voices-dir", str(out.parent / "demo-voices"), "--torch-threads", "1",
    ]  # fmt: skip
    print("$ qwen3tts-rt " + " ".join(shlex.quote(x) for x in serve_args) + " &", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "qwen3tts_rt.cli", *serve_args])
    try:
        with grpc.insecure_channel(addr) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None:
                    raise SystemExit("demo: the server exited")
                try:
                    if (
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("demo: the server did not become ready")
                time.sleep(0.2)
        ref = out.parent / "demo-reference.wav"
        ref.write_bytes(_reference_wav())
        voice_id = _run(
            ["voice", "create", "--addr", addr, "--ref-audio", str(ref), "--x-vector-only", "--name", "demo"]
        ).strip()
        _run(
            ["say", "--addr", addr, "--voice", voice_id, "--language", "english", "--text", a.text,
             "--tokens-per-second", f"{a.tokens_per_second:g}", "--out", str(out)]
        )  # fmt: skip
        print(latency_summary(metrics_port))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
