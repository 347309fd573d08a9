"""Builders for the bad-input corpus: reference audio in every broken shape, made at test
time with numpy and PyAV (no committed binaries, no ffmpeg binary)."""

from __future__ import annotations

import functools
import io
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import cast

import av
import numpy as np
from av.audio.stream import AudioStream

from qwen3tts_rt.synthetic import synthetic_speech

RATE = 24000


def short_greedy_checkpoint(src: Path, dest: Path, max_new_tokens: int) -> Path:
    """A copy of checkpoint ``src`` whose generation defaults are greedy and stop after
    ``max_new_tokens`` (for clients that cannot ask, e.g. Riva's, and short test streams)."""
    shutil.copytree(src, dest)
    gen_path = dest / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen.update(do_sample=False, subtalker_dosample=False, max_new_tokens=max_new_tokens)
    gen_path.write_text(json.dumps(gen, indent=2))
    return dest


def speech(seconds: float, rate: int = RATE, channels: int = 1, seed: int = 0) -> np.ndarray:
    """[C, S] float32: ``synthetic_speech`` in every channel, channel c at its own pitch
    (140 + 40·c Hz) and noise (seed + c), so that a downmix is not one channel."""
    return np.stack(
        [synthetic_speech(seconds, rate, pitch=140.0 + 40.0 * c, seed=seed + c) for c in range(channels)]
    )


def has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:
        return False
    return True


def encode(x: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    """[C, S] float samples encoded with PyAV into an in-memory file."""
    layout = {1: "mono", 2: "stereo"}[x.shape[0]]
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = cast(AudioStream, out.add_stream(codec, rate=rate, layout=layout))
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(x, dtype=np.float32), format="fltp", layout=layout
        )
        frame.sample_rate = rate
        size = stream.codec_context.frame_size or None
        conv = av.AudioResampler(format=stream.format, layout=layout, rate=rate, frame_size=size)
        for f in [*conv.resample(frame), *conv.resample(None)]:
            out.mux(stream.encode(f))
        out.mux(stream.encode(None))
    return buf.getvalue()


def wav16(x: np.ndarray, rate: int = RATE) -> bytes:
    return encode(x, rate, "wav", "pcm_s16le")


def float_wav(x: np.ndarray, rate: int = RATE) -> bytes:
    """Mono IEEE-float WAV written by hand, so that NaN and Inf reach the file untouched."""
    data = np.ascontiguousarray(x.reshape(-1), dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = (
        b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def wav_header(*, channels: int = 1, rate: int = RATE, bits: int = 16, data_bytes: int = 0) -> bytes:
    """A PCM WAV header (RIFF, fmt, data chunk header) with any field values."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    body_len = 4 + 8 + len(fmt) + 8 + data_bytes
    return (
        b"RIFF"
        + struct.pack("<I", body_len)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def damaged(data: bytes, at: float, n: int, seed: int = 7) -> bytes:
    """``data`` with ``n`` bytes from fraction ``at`` of its length replaced by noise."""
    b = bytearray(data)
    i = int(len(b) * at)
    b[i : i + n] = np.random.default_rng(seed).bytes(n)
    return bytes(b)


def cut(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


# --------------------------------------------------------------------------- named inputs


def _mp3(seconds: float = 3.0, rate: int = RATE) -> bytes:
    return encode(speech(seconds, rate), rate, "mp3", "libmp3lame")


def _m4a(seconds: float = 3.0) -> bytes:
    return encode(speech(seconds), RATE, "ipod", "aac")


def _flac(seconds: float = 3.0) -> bytes:
    return encode(speech(seconds), RATE, "flac", "flac")


def _mp4_box_then(payload: bytes) -> bytes:
    """An MP4 ``ftyp`` box (the M4A signature) in front of something else."""
    ftyp = b"M4A " + struct.pack(">I", 0) + b"M4A mp42isom"
    return struct.pack(">I", 8 + len(ftyp)) + b"ftyp" + ftyp + payload


def _id3_then(payload: bytes) -> bytes:
    """An empty ID3v2.4 tag (the MP3 signature) in front of something else."""
    return b"ID3\x04\x00\x00\x00\x00\x00\x00" + payload


# name -> (builder, encoders it needs). Each is built once, when a test first asks for it.
AUDIO: dict[str, tuple[Callable[[], bytes], tuple[str, ...]]] = {
    "wav 24 kHz mono 1.5 s": (lambda: wav16(speech(1.5)), ()),
    "wav truncated": (lambda: cut(wav16(speech(3.0)), 0.5), ()),
    "wav header only": (lambda: cut(wav16(speech(3.0)), 44 / len(wav16(speech(3.0)))), ()),
    "wav corrupt header (0 channels)": (
        lambda: wav_header(channels=0, data_bytes=96000) + bytes(96000),
        (),
    ),
    "mp3 truncated": (lambda: cut(_mp3(), 0.5), ("libmp3lame",)),
    "mp3 corrupt": (lambda: damaged(_mp3(4.0), 0.3, 2000), ("libmp3lame",)),
    "m4a truncated": (lambda: cut(_m4a(), 0.6), ("aac",)),
    "m4a corrupt": (lambda: damaged(_m4a(4.0), 0.5, 64), ("aac",)),
    "flac damaged frame": (lambda: damaged(_flac(4.0), 0.5, 64), ("flac",)),
    "m4a signature, mp3 inside": (lambda: _mp4_box_then(_mp3()), ("libmp3lame",)),
    "mp3 signature, wav inside": (lambda: _id3_then(wav16(speech(3.0))), ()),
    "wav 8 kHz": (lambda: wav16(speech(2.0, 8000), 8000), ()),
    "mp3 16 kHz": (lambda: _mp3(2.0, 16000), ("libmp3lame",)),
    "wav stereo 48 kHz": (lambda: wav16(speech(2.0, 48000, channels=2), 48000), ()),
    "mp3 stereo 48 kHz": (
        lambda: encode(speech(2.0, 48000, channels=2), 48000, "mp3", "libmp3lame"),
        ("libmp3lame",),
    ),
    "m4a 24 kHz": (lambda: _m4a(2.0), ("aac",)),
    "11 MB": (lambda: wav_header(data_bytes=11_000_000 - 44) + bytes(11_000_000 - 44), ()),
    "61 s": (lambda: wav16(speech(61.0)), ()),
    "0.2 s": (lambda: wav16(speech(0.2)), ()),
    "all-zero": (lambda: wav16(np.zeros((1, 2 * RATE), np.float32)), ()),
    "NaN float wav": (lambda: float_wav(np.where(np.arange(2 * RATE) == 500, np.nan, speech(2.0)[0])), ()),
    "Inf float wav": (
        lambda: float_wav(np.where(np.arange(2 * RATE) % 997 == 0, np.inf, speech(2.0)[0])),
        (),
    ),
    "empty bytes": (lambda: b"", ()),
}


@functools.cache
def audio(name: str) -> bytes:
    return AUDIO[name][0]()


def missing_encoders(name: str) -> list[str]:
    return [e for e in AUDIO[name][1] if not has_encoder(e)]
