"""Baseline (b) of the concurrency benchmark: the OFFICIAL qwen-tts package synthesising
the same utterances on the same checkpoint. Its time to first audio is its whole generate +
decode (it does not stream), so that is what is timed.

Runs in the reference venv (``bash tests/reference/ref_venv.sh`` makes it), never imports
qwen3tts_rt; started as a subprocess by ``benchmarks.official``:

    .venv-ref/bin/python benchmarks/official_runner.py JOB.json OUT.json

JOB.json: {"model", "device", "dtype", "threads", "ref_audio_npy", "max_new_tokens",
"greedy", "runs", "utterances": [{"text", "language"}, ...]}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

# The stubs for the official package's 25 Hz-tokenizer imports live with the reference
# generator; importing it installs them and imports the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reference"))
from make_reference import Qwen3TTSModel


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    device, dtype = job["device"], getattr(torch, job["dtype"])
    t0 = time.perf_counter()
    kw: dict = {"dtype": dtype}
    if device != "cpu":
        kw["device_map"] = device
    tts = Qwen3TTSModel.from_pretrained(job["model"], **kw)
    load_s = time.perf_counter() - t0
    ref = np.load(job["ref_audio_npy"]).astype(np.float32)
    prompt = tts.create_voice_clone_prompt(ref_audio=(ref, 24000), x_vector_only_mode=True)
    gen = dict(max_new_tokens=int(job["max_new_tokens"]), non_streaming_mode=False)
    if job.get("greedy", True):
        gen.update(do_sample=False, subtalker_dosample=False)

    decode = tts.model.speech_tokenizer.decode
    decode_s: list[float] = []

    def timed_decode(items):  # type: ignore[no-untyped-def]
        _sync(device)
        d0 = time.perf_counter()
        out = decode(items)
        _sync(device)
        decode_s.append(time.perf_counter() - d0)
        return out

    tts.model.speech_tokenizer.decode = timed_decode

    def one(text: str, language: str) -> dict:
        decode_s.clear()
        _sync(device)
        s0 = time.perf_counter()
        wavs, sr = tts.generate_voice_clone(text=text, language=language, voice_clone_prompt=prompt, **gen)
        _sync(device)
        total = time.perf_counter() - s0
        audio_s = len(wavs[0]) / sr
        dec = sum(decode_s)
        return {
            "text": text,
            "language": language,
            "total_s": total,  # = time to first audio: nothing is heard before it returns
            "generate_s": total - dec,
            "decode_s": dec,
            "audio_s": audio_s,
            "frames": round(audio_s * 12.5),
            "rtf": total / audio_s if audio_s > 0 else None,
        }

    first = job["utterances"][0]
    warm = one(first["text"], first["language"])  # first call: lazy inits, allocator
    runs = [one(u["text"], u["language"]) for _ in range(int(job["runs"])) for u in job["utterances"]]
    result = {
        "package": "qwen-tts",
        "qwen_tts_version": _version("qwen-tts"),
        "transformers": _version("transformers"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "dtype": job["dtype"],
        "load_s": load_s,
        "generate_kwargs": gen,
        "warmup": warm,
        "runs": runs,
    }
    Path(out_path).write_text(json.dumps(result, indent=2) + "\n")


def _version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:  # pragma: no cover
        return "?"


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
