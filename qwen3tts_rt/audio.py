"""Audio in and out: reference-audio loading and validation, WAV files, PCM encodings,
and resampling (one-shot and packet by packet).

Reference audio arrives as a path, raw bytes, base64 text (optionally a ``data:`` URI) or a
numpy array. Encoded input is decoded with PyAV from memory; the container format is
sniffed from the content (magic bytes), never guessed from a file name, and only audio
demuxers are ever opened. Every rejection raises one ``ReferenceAudioError`` subclass whose
message says what was wrong and what is allowed.

Samples leave this module as float32 mono in [-1, 1]; the model's rate is 24 kHz.
"""

from __future__ import annotations

import base64
import binascii
import enum
import io
import math
import os
import struct
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import av
import numpy as np

from qwen3tts_rt.errors import (
    AudioEmptyError,
    AudioNonFiniteError,
    AudioSampleRateError,
    AudioSilentError,
    AudioTooLargeError,
    AudioTooLongError,
    AudioTooShortError,
    AudioUndecodableError,
    ReferenceAudioError,
)

MODEL_SAMPLE_RATE = 24000

# Rates the server may be asked to produce (StreamResampler converts to any rate; these
# are the ones telephony and the voice-agent frameworks use).
SUPPORTED_OUTPUT_RATES: tuple[int, ...] = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class ReferenceAudioRules:
    """What reference audio for voice cloning must satisfy (errors) or should (warnings)."""

    max_bytes: int = 10 * 1024 * 1024  # encoded size, checked before decoding
    # What decoding may allocate (a few kB of FLAC can declare 1 MHz, 8 channels, 60 s: GBs):
    # rate and channels are checked from the stream header before decoding and again on each
    # decoded frame; decoding stops as soon as the decoded samples pass max_decoded_bytes.
    max_sample_rate: int = 192_000  # input rate (Hz); higher is refused
    max_channels: int = 8  # input channels; more are refused
    max_decoded_bytes: int = 64 * 1024 * 1024  # decoded samples as float32, all channels
    max_seconds: float = 60.0
    min_seconds: float = 1.0
    recommended_min_seconds: float = 10.0  # outside 10-20 s: a warning, not an error
    recommended_max_seconds: float = 20.0
    min_sample_rate: int = 24000  # lower rates lack the bandwidth the codec reproduces
    target_sample_rate: int = MODEL_SAMPLE_RATE
    silence_peak: float = 1e-3  # peak below -60 dBFS: silent
    silence_rms: float = 1e-4  # RMS below -80 dBFS: silent
    clipped_fraction: float = 1e-3  # more than 0.1 % of samples at full scale: a warning
    max_ref_text_chars: int = 2000  # the transcript (ICL): 60 s of speech is ~1,000 characters


DEFAULT_RULES = ReferenceAudioRules()


@dataclass
class ReferenceAudio:
    """Validated reference audio, ready for the speaker encoder and the codec encoder."""

    wav: np.ndarray  # [S] float32 mono in [-1, 1] at ``sample_rate``
    sample_rate: int
    original_sample_rate: int
    original_channels: int
    duration_s: float
    source_format: str  # "wav", "mp3", "m4a", ..., or "array"
    notes: list[str] = field(default_factory=list)  # what was done to the audio
    warnings: list[str] = field(default_factory=list)  # allowed, but likely to clone worse


# --------------------------------------------------------------------------- formats

# sniffed kind -> (FFmpeg demuxer, name used in messages)
_FORMATS: dict[str, tuple[str, str]] = {
    "wav": ("wav", "WAV"),
    "flac": ("flac", "FLAC"),
    "ogg": ("ogg", "OGG (Vorbis/Opus)"),
    "mp3": ("mp3", "MP3"),
    "aac": ("aac", "AAC (ADTS)"),
    "m4a": ("mov", "M4A/MP4 (AAC)"),
    "webm": ("matroska", "WebM/Matroska"),
    "aiff": ("aiff", "AIFF"),
}
_ALLOWED_FORMATS_TEXT = ", ".join(name for _, name in _FORMATS.values())

_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
_SIZE_PLACEHOLDER = 0x7FFF0000  # WAV sizes at or above this are "unknown" (streamed writers)


def _sniff_format(data: bytes) -> str | None:
    """The container kind from magic bytes, or None when it is no supported audio format."""
    head = data[:16]
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[4:8] in _MP4_BOXES:
        return "m4a"
    if head[:3] == b"ID3" and len(data) >= 10:
        # ID3v2 tag: 10-byte header, syncsafe size, optional 10-byte footer; see what follows
        end = _id3_end(data)
        after = _sniff_format(data[end:]) if end < len(data) else None
        return after if after in ("flac", "aac") else "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        layer = (head[1] >> 1) & 0x3
        return "aac" if layer == 0 else "mp3"
    return None


def is_audio_file(data: bytes) -> bool:
    """Whether ``data`` starts like a supported audio file by an unambiguous signature
    (RIFF/RF64, fLaC, OggS, EBML, FORM, an MP4 box, an ID3 tag). A bare MPEG frame sync
    is not enough: two bytes that raw PCM samples can also start with."""
    kind = _sniff_format(data)
    return kind is not None and (kind not in ("mp3", "aac") or data[:3] == b"ID3")


def _check_wav_complete(data: bytes) -> None:
    """Raise when a RIFF/WAVE file ends before the sample data its header announces
    (FFmpeg would silently decode the part that is there)."""
    if data[:4] != b"RIFF":
        return  # RF64 keeps its sizes in a ds64 chunk; let the decoder judge
    pos = 12
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        if chunk_id == b"data":
            have = len(data) - pos - 8
            if 0 < size < _SIZE_PLACEHOLDER and size > have:
                raise AudioUndecodableError(
                    f"reference audio WAV is truncated: its header announces {size} bytes of samples "
                    f"but only {have} are present; send the complete file"
                )
            return
        if size >= _SIZE_PLACEHOLDER:
            break
        pos += 8 + size + (size & 1)
    raise AudioUndecodableError(
        "reference audio WAV has no sample data (no 'data' chunk before the end of the file); "
        "send a complete WAV file"
    )


def _id3_end(data: bytes) -> int:
    """Offset just past a leading ID3v2 tag (0 when there is none)."""
    if data[:3] != b"ID3" or len(data) < 10:
        return 0
    size = (data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F)
    return 10 + size + (10 if data[5] & 0x10 else 0)


def _mp3_announced_bytes(data: bytes, start: int) -> int | None:
    """The stream size that a Xing/Info (LAME) header in the MP3 frame at ``start``
    announces (bytes from that frame on), or None when there is no such header or it
    omits the size."""
    head = data[start : start + 4]
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return None
    mpeg1 = (head[1] >> 3) & 0x3 == 0x3
    mono = (head[3] >> 6) & 0x3 == 0x3
    side_info = (17 if mono else 32) if mpeg1 else (9 if mono else 17)
    pos = start + 4 + (0 if head[1] & 0x1 else 2) + side_info  # past the header (and its CRC)
    if data[pos : pos + 4] not in (b"Xing", b"Info") or len(data) < pos + 16:
        return None
    (flags,) = struct.unpack_from(">I", data, pos + 4)
    if not flags & 0x2:  # no byte count
        return None
    (announced,) = struct.unpack_from(">I", data, pos + 8 + (4 if flags & 0x1 else 0))
    return int(announced) or None


def _check_mp3_complete(data: bytes) -> None:
    """Raise when an MP3 stream ends before the size its Xing/Info header announces
    (the decoder would silently return the part that is there)."""
    start = _id3_end(data)
    announced = _mp3_announced_bytes(data, start)
    have = len(data) - start
    if announced is not None and announced > have:
        raise AudioUndecodableError(
            f"reference audio MP3 is truncated: its Xing/Info header announces {announced} bytes "
            f"but only {have} are present; send the complete file"
        )


# Containers whose headers state the exact duration (MP3 only with a Xing/Info header,
# checked by size above; ADTS and header-less MP3 durations are bit-rate estimates).
_EXACT_DURATION = ("flac", "m4a", "webm", "aiff")
_DURATION_SLACK_S = 0.05  # decoders trim priming samples (Opus pre-skip: 6.5 ms)
_DURATION_SLACK_FRACTION = 0.01


# --------------------------------------------------------------------------- decoding


def _frame_to_float(frame: av.AudioFrame) -> np.ndarray:
    """One decoded frame as float32 [C, n], integers scaled to [-1, 1)."""
    fmt = frame.format.name
    arr = frame.to_ndarray()  # planar [C, n]; packed [1, n * C] interleaved
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        arr = arr.reshape(-1, channels).T
    base = fmt.rstrip("p")
    if base in ("flt", "dbl"):
        return arr.astype(np.float32, copy=False)
    if base == "u8":
        return (arr.astype(np.float32) - 128.0) / 128.0
    scale = {"s16": 2.0**15, "s32": 2.0**31, "s64": 2.0**63}.get(base)
    if scale is None:
        raise AudioUndecodableError(f"reference audio decodes to an unsupported sample format {fmt!r}")
    return (arr.astype(np.float64) / scale).astype(np.float32)


@dataclass
class _Decoded:
    samples: np.ndarray  # [C, S] float32
    sample_rate: int
    kind: str


def _decode(data: bytes, rules: ReferenceAudioRules | None) -> _Decoded:
    """Decode an encoded audio file held in memory. With ``rules``, what decoding may
    allocate is bounded: the sample rate and channel count are checked from the stream
    header before decoding and on every decoded frame, and decoding stops as soon as the
    decoded samples pass ``max_decoded_bytes`` or ``max_seconds`` (a few kB of FLAC can
    declare a megahertz rate, eight channels and a minute: gigabytes of samples)."""
    kind = _sniff_format(data)
    if kind is None:
        raise AudioUndecodableError(
            f"reference audio is not in a recognised audio format (first bytes {data[:8].hex(' ')}); "
            f"supported formats: {_ALLOWED_FORMATS_TEXT}"
        )
    if kind == "wav":
        _check_wav_complete(data)
    elif kind == "mp3":
        _check_mp3_complete(data)
    demuxer, label = _FORMATS[kind]
    try:
        return _decode_with(data, kind, demuxer, rules)
    except ReferenceAudioError:
        raise
    except Exception as exc:  # whatever the native decoder throws means "cannot decode"
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise AudioUndecodableError(
            f"reference audio looks like {label} but could not be decoded ({reason}); "
            f"send a complete, valid file in one of: {_ALLOWED_FORMATS_TEXT}"
        ) from exc


def _decode_with(data: bytes, kind: str, demuxer: str, rules: ReferenceAudioRules | None) -> _Decoded:
    label = _FORMATS[kind][1]
    with av.open(io.BytesIO(data), mode="r", format=demuxer) as container:
        if not container.streams.audio:
            raise AudioUndecodableError(f"reference audio {label} container holds no audio stream")
        stream = container.streams.audio[0]
        announced_s = container.duration / av.time_base if container.duration else None
        if rules is not None:  # what the header declares, before anything is decoded
            ctx = stream.codec_context
            _check_allocation(int(ctx.sample_rate or 0), int(ctx.channels or 0), rules)
            if ctx.sample_rate:
                _check_rate(int(ctx.sample_rate), rules)
        rate = 0  # the decoded frames' rate (authoritative: HE-AAC headers announce half of it)
        max_samples = math.inf
        parts: list[np.ndarray] = []
        total = 0  # samples per channel
        decoded_bytes = 0  # as float32, all channels
        for frame in container.decode(stream):
            frame_rate, channels = int(frame.sample_rate), len(frame.layout.channels)
            if rules is not None:
                _check_allocation(frame_rate, channels, rules)
                decoded_bytes += frame.samples * channels * 4
                if decoded_bytes > rules.max_decoded_bytes:
                    raise AudioTooLargeError(
                        f"reference audio decodes to more than {rules.max_decoded_bytes / 2**20:g} MiB of "
                        f"samples ({channels} channel(s) at {frame_rate} Hz; decoding stopped at "
                        f"{(total + frame.samples) / frame_rate:.1f} s); send mono or stereo audio of at "
                        f"most {rules.max_seconds:g} s at 48 kHz or less"
                    )
            if not rate:
                rate = frame_rate
                if rules is not None:
                    _check_rate(rate, rules)
                    max_samples = rules.max_seconds * rate
            elif frame_rate != rate:
                raise AudioUndecodableError(
                    f"reference audio changes its sample rate mid-stream ({rate} -> {frame_rate} Hz); "
                    f"send a file with one sample rate"
                )
            part = _frame_to_float(frame)  # [C, n]
            if parts and part.shape[0] != parts[0].shape[0]:
                raise AudioUndecodableError(
                    f"reference audio changes its channel count mid-stream "
                    f"({parts[0].shape[0]} -> {part.shape[0]}); send a file with a fixed layout"
                )
            parts.append(part)
            total += part.shape[1]
            if total > max_samples:
                assert rules is not None
                raise AudioTooLongError(
                    f"reference audio is longer than {rules.max_seconds:g} s (decoding stopped at "
                    f"{total / rate:.1f} s); send at most {rules.max_seconds:g} s, ideally "
                    f"{rules.recommended_min_seconds:g}-{rules.recommended_max_seconds:g} s of speech"
                )
    if total == 0:
        if kind == "wav":
            raise AudioEmptyError("reference audio WAV file contains no samples; send a recording of speech")
        raise AudioUndecodableError(
            f"no audio could be decoded from the reference audio (it looks like {label}); "
            f"send a complete, valid file in one of: {_ALLOWED_FORMATS_TEXT}"
        )
    if kind in _EXACT_DURATION and announced_s is not None:
        decoded_s = total / rate
        if decoded_s < announced_s - max(_DURATION_SLACK_S, _DURATION_SLACK_FRACTION * announced_s):
            raise AudioUndecodableError(
                f"reference audio {label} is truncated or damaged: it decodes to {decoded_s:.2f} s but "
                f"its header announces {announced_s:.2f} s; send the complete, undamaged file"
            )
    return _Decoded(np.concatenate(parts, axis=1), rate, kind)


# --------------------------------------------------------------------------- checks


def _check_allocation(rate: int, channels: int, rules: ReferenceAudioRules) -> None:
    """The limits on what decoding allocates (0: not known yet)."""
    if rate > rules.max_sample_rate:
        raise AudioSampleRateError(
            f"reference audio is {rate} Hz; at most {rules.max_sample_rate} Hz is accepted "
            f"(the model works at {rules.target_sample_rate} Hz: send 24-48 kHz)"
        )
    if channels > rules.max_channels:
        raise AudioTooLargeError(
            f"reference audio has {channels} channels; at most {rules.max_channels} are accepted "
            f"(send mono or stereo)"
        )


def _check_rate(rate: int, rules: ReferenceAudioRules) -> None:
    _check_allocation(rate, 0, rules)
    if rate < rules.min_sample_rate:
        raise AudioSampleRateError(
            f"reference audio is {rate} Hz; at least {rules.min_sample_rate} Hz is required "
            f"(send the original recording; upsampling a low-rate one does not restore the missing "
            f"bandwidth)"
        )


def _check_finite(samples: np.ndarray) -> None:
    if samples.dtype.kind == "f" and not np.isfinite(samples).all():
        bad = int(samples.size - np.count_nonzero(np.isfinite(samples)))
        raise AudioNonFiniteError(
            f"reference audio contains {bad} NaN or infinite sample(s); every sample must be a finite "
            f"number in [-1, 1]"
        )


def _check_duration(n_samples: int, rate: int, rules: ReferenceAudioRules) -> float:
    duration = n_samples / rate
    if duration > rules.max_seconds:
        raise AudioTooLongError(
            f"reference audio is {duration:.1f} s; at most {rules.max_seconds:g} s is allowed "
            f"({rules.recommended_min_seconds:g}-{rules.recommended_max_seconds:g} s of speech is ideal)"
        )
    if duration < rules.min_seconds:
        raise AudioTooShortError(
            f"reference audio is {duration:.2f} s; at least {rules.min_seconds:g} s is required "
            f"({rules.recommended_min_seconds:g}-{rules.recommended_max_seconds:g} s of speech is ideal)"
        )
    return duration


def _check_size(n_bytes: int, rules: ReferenceAudioRules) -> None:
    if n_bytes == 0:
        raise AudioEmptyError(
            f"reference audio is empty (0 bytes); send an audio file of {rules.min_seconds:g}-"
            f"{rules.max_seconds:g} s ({_ALLOWED_FORMATS_TEXT})"
        )
    if n_bytes > rules.max_bytes:
        raise AudioTooLargeError(
            f"reference audio is {n_bytes / 2**20:.1f} MiB; at most {rules.max_bytes / 2**20:g} MiB "
            f"({rules.max_bytes} bytes) is allowed (send a shorter clip or a compressed format)"
        )


def _dbfs(x: float) -> str:
    return "-inf dBFS" if x <= 0 else f"{20 * math.log10(x):.0f} dBFS"


# --------------------------------------------------------------------------- input forms


def _bytes_from_string(s: str, allow_paths: bool, rules: ReferenceAudioRules) -> bytes:
    """Bytes named by a string: a ``data:`` URI, a file path (when allowed) or base64."""
    text = s.strip()
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or ";base64" not in header:
            raise AudioUndecodableError(
                "reference audio data URI must be base64 encoded ('data:audio/<type>;base64,<data>')"
            )
        return _b64decode(payload, rules)
    looks_like_path = len(text) < 4096 and "\n" not in text
    if allow_paths and looks_like_path and _is_file(text):
        return _read_file(Path(text), rules)
    try:
        return _b64decode(text, rules)
    except AudioUndecodableError:
        if allow_paths and looks_like_path and ("/" in text or os.sep in text or "." in text[-6:]):
            raise AudioUndecodableError(
                f"reference audio path {text!r} does not name a readable file (and the string is not base64)"
            ) from None
        raise


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # name too long, NUL byte, ...
        return False


def _b64decode(payload: str, rules: ReferenceAudioRules) -> bytes:
    compact = "".join(payload.split())
    if len(compact) // 4 * 3 > rules.max_bytes + 3:  # reject before decoding
        _check_size(len(compact) // 4 * 3, rules)
    compact = compact.replace("-", "+").replace("_", "/")  # accept the URL-safe alphabet too
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AudioUndecodableError(
            "reference audio string is neither base64 nor a 'data:audio/...;base64,' URI"
        ) from exc


def _read_file(path: Path, rules: ReferenceAudioRules) -> bytes:
    try:
        _check_size(path.stat().st_size, rules)  # before reading a huge file
        return path.read_bytes()
    except OSError as exc:
        raise AudioUndecodableError(
            f"reference audio file {str(path)!r} cannot be read: {exc.strerror}"
        ) from exc


def _array_to_channels(arr: np.ndarray) -> np.ndarray:
    """A caller's array as float [C, S]: [S], [S, C] or [C, S] (channels = the short axis)."""
    if arr.ndim == 1:
        return arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"reference audio array must be [S], [S, C] or [C, S], got shape {arr.shape}")
    chans_first = arr.shape[0] <= arr.shape[1]
    out = arr if chans_first else arr.T
    if out.shape[0] > 16:
        raise ValueError(
            f"reference audio array of shape {arr.shape} is ambiguous: neither axis looks like a "
            f"channel axis (at most 16 channels)"
        )
    return out


def _int_to_float(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)
    if arr.dtype == np.uint8:
        return (arr.astype(np.float32) - 128.0) / 128.0
    if arr.dtype.kind == "i":
        return (arr.astype(np.float64) / float(2 ** (8 * arr.dtype.itemsize - 1))).astype(np.float32)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iuf":
        raise ValueError(f"reference audio array must hold float or signed-integer samples, got {arr.dtype}")
    return arr.astype(np.float32)


# --------------------------------------------------------------------------- public: loading

AudioSource = str | os.PathLike[str] | bytes | bytearray | memoryview | np.ndarray


def load_reference_audio(
    src: AudioSource,
    *,
    sample_rate: int | None = None,
    rules: ReferenceAudioRules = DEFAULT_RULES,
    allow_paths: bool = True,
) -> ReferenceAudio:
    """Decode, check and normalise reference audio for voice cloning.

    ``src`` is a path (``Path`` or ``str``), raw file bytes, a base64 string or
    ``data:audio/...;base64,`` URI, or a numpy array of samples (then ``sample_rate`` is
    required; float in [-1, 1] or integer PCM; [S], [S, C] or [C, S]).
    Strings that come from clients must be loaded with ``allow_paths=False`` so that they
    can never name a file on the server.

    Returns float32 mono at ``rules.target_sample_rate``: multi-channel audio is averaged,
    higher rates are resampled, audio whose peak exceeds full scale is scaled down; each of
    these is recorded in ``notes``. Raises a ``ReferenceAudioError`` subclass naming the rule
    that was broken.
    """
    notes: list[str] = []
    if isinstance(src, np.ndarray):
        if sample_rate is None:
            raise ValueError("load_reference_audio: a numpy array needs sample_rate=")
        if src.size == 0:
            raise AudioEmptyError("reference audio array holds no samples; send a recording of speech")
        _check_finite(src)
        samples = _int_to_float(_array_to_channels(src))  # [C, S]
        rate, kind = int(sample_rate), "array"
        _check_rate(rate, rules)
    else:
        if sample_rate is not None:
            raise ValueError("load_reference_audio: sample_rate= applies to numpy arrays only")
        if isinstance(src, os.PathLike):
            data = _read_file(Path(src), rules)
        elif isinstance(src, str):
            data = _bytes_from_string(src, allow_paths, rules) if src.strip() else b""
        elif isinstance(src, bytes | bytearray | memoryview):
            data = bytes(src)
        else:
            raise TypeError(f"load_reference_audio: unsupported source type {type(src).__name__}")
        _check_size(len(data), rules)
        decoded = _decode(data, rules)
        samples, rate, kind = decoded.samples, decoded.sample_rate, decoded.kind
        _check_finite(samples)

    channels = samples.shape[0]
    _check_duration(samples.shape[1], rate, rules)

    if channels > 1:
        samples = samples.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)
        notes.append(f"down-mixed {channels} channels to mono (channel average)")
    mono = np.ascontiguousarray(samples[0], dtype=np.float32)  # [S]

    peak = float(np.abs(mono).max())
    rms = float(np.sqrt(np.mean(np.square(mono, dtype=np.float64))))
    if peak < rules.silence_peak or rms < rules.silence_rms:
        raise AudioSilentError(
            f"reference audio is silent (peak {_dbfs(peak)}, RMS {_dbfs(rms)}); it must contain audible "
            f"speech: peak at least {_dbfs(rules.silence_peak)} and RMS at least {_dbfs(rules.silence_rms)}"
        )
    warnings: list[str] = []
    clipped = float(np.count_nonzero(np.abs(mono) >= 0.999)) / mono.size
    if clipped > rules.clipped_fraction:
        warnings.append(
            f"reference audio looks clipped ({100 * clipped:.2f}% of samples at full scale); "
            f"the clone will copy the distortion"
        )

    if rate != rules.target_sample_rate:
        mono = resample(mono, rate, rules.target_sample_rate)
        notes.append(f"resampled {rate} Hz to {rules.target_sample_rate} Hz")
    peak = float(np.abs(mono).max()) if mono.size else 0.0
    if peak > 1.0:
        mono = (mono / peak).astype(np.float32)
        notes.append(f"peak {peak:.3f} exceeded full scale; scaled down to 1.0")

    duration = mono.size / rules.target_sample_rate
    if not rules.recommended_min_seconds <= duration <= rules.recommended_max_seconds:
        warnings.append(
            f"reference audio is {duration:.1f} s; {rules.recommended_min_seconds:g}-"
            f"{rules.recommended_max_seconds:g} s of clean speech clones best"
        )
    return ReferenceAudio(
        wav=mono,
        sample_rate=rules.target_sample_rate,
        original_sample_rate=rate,
        original_channels=channels,
        duration_s=duration,
        source_format=kind,
        notes=notes,
        warnings=warnings,
    )


# --------------------------------------------------------------------------- WAV files


def _to_int16(wav: np.ndarray) -> np.ndarray:
    if wav.dtype == np.int16:
        return wav
    if wav.dtype.kind != "f":
        raise ValueError(f"expected float samples in [-1, 1] (or int16), got {wav.dtype}")
    scaled = np.round(np.nan_to_num(wav, nan=0.0, posinf=1.0, neginf=-1.0).astype(np.float64) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def write_wav(dest: str | os.PathLike[str] | IO[bytes], wav: np.ndarray, sample_rate: int) -> None:
    """Write mono float samples [S] in [-1, 1] (or int16) as a 16-bit PCM WAV file.
    Values outside [-1, 1] are clipped."""
    if wav.ndim != 1:
        raise ValueError(f"write_wav expects mono samples [S], got shape {wav.shape}")
    pcm = _to_int16(wav).astype("<i2", copy=False)
    target: Any = os.fspath(dest) if isinstance(dest, os.PathLike) else dest
    with wave.open(target, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())


def read_wav(src: str | os.PathLike[str] | bytes | IO[bytes]) -> tuple[np.ndarray, int]:
    """Read a WAV file (integer PCM of 8-32 bits or float) -> (float32 samples, rate).

    Samples are [S] for mono and [S, C] for more channels; nothing is resampled or checked.
    """
    if isinstance(src, bytes):
        data = src
    elif isinstance(src, str | os.PathLike):
        data = Path(src).read_bytes()
    else:
        data = src.read()
    if _sniff_format(data) != "wav":
        raise ValueError("read_wav: not a RIFF/WAVE file")
    try:
        decoded = _decode(data, rules=None)
    except ReferenceAudioError as exc:
        raise ValueError(f"read_wav: {exc}") from exc
    samples = decoded.samples  # [C, S]
    out = samples[0] if samples.shape[0] == 1 else samples.T
    return np.ascontiguousarray(out, dtype=np.float32), decoded.sample_rate


# --------------------------------------------------------------------------- PCM encodings


class PcmEncoding(str, enum.Enum):
    """Sample encodings for raw output streams."""

    PCM_S16LE = "PCM_S16LE"  # 16-bit signed little-endian
    FLOAT32_LE = "FLOAT32_LE"  # IEEE float32 little-endian, [-1, 1]
    MULAW = "MULAW"  # G.711 mu-law, 8 bits
    ALAW = "ALAW"  # G.711 A-law, 8 bits

    @property
    def bytes_per_sample(self) -> int:
        return {"PCM_S16LE": 2, "FLOAT32_LE": 4, "MULAW": 1, "ALAW": 1}[self.value]


# G.711 segment end points: mu-law on 14-bit magnitudes (with bias), A-law on 13-bit ones.
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)
_ULAW_BIAS = 0x84 >> 2  # 33 on the 14-bit scale
_ULAW_CLIP = 8159


def lin2ulaw(pcm: np.ndarray) -> np.ndarray:
    """G.711 mu-law bytes [S] uint8 from int16 samples [S] (the ITU/Sun reference coder)."""
    x = pcm.astype(np.int32) >> 2  # 14-bit, floor shift as in the reference coder
    negative = x < 0
    mag = np.minimum(np.where(negative, -x, x), _ULAW_CLIP) + _ULAW_BIAS
    seg = np.searchsorted(_ULAW_SEG_END, mag, side="left")  # first segment whose end >= mag
    mantissa = (mag >> (np.minimum(seg, 7) + 1)) & 0xF
    code = np.where(seg >= 8, 0x7F, (seg << 4) | mantissa)
    mask = np.where(negative, 0x7F, 0xFF)
    return (code ^ mask).astype(np.uint8)


def lin2alaw(pcm: np.ndarray) -> np.ndarray:
    """G.711 A-law bytes [S] uint8 from int16 samples [S] (the ITU/Sun reference coder)."""
    x = pcm.astype(np.int32) >> 3  # 13-bit
    negative = x < 0
    mag = np.where(negative, -x - 1, x)
    seg = np.searchsorted(_ALAW_SEG_END, mag, side="left")
    shift = np.where(seg < 2, 1, np.minimum(seg, 7))
    code = np.where(seg >= 8, 0x7F, (np.minimum(seg, 7) << 4) | ((mag >> shift) & 0xF))
    mask = np.where(negative, 0x55, 0xD5)
    return (code ^ mask).astype(np.uint8)


def encode_pcm(wav: np.ndarray, encoding: PcmEncoding | str) -> bytes:
    """Float samples [S] in [-1, 1] (clipped) -> raw bytes in ``encoding``."""
    enc = PcmEncoding(encoding)
    if wav.ndim != 1:
        raise ValueError(f"encode_pcm expects mono samples [S], got shape {wav.shape}")
    if enc is PcmEncoding.FLOAT32_LE:
        clean = np.nan_to_num(wav, nan=0.0, posinf=1.0, neginf=-1.0)
        return np.clip(clean, -1.0, 1.0).astype("<f4").tobytes()
    pcm = _to_int16(wav)
    if enc is PcmEncoding.PCM_S16LE:
        return pcm.astype("<i2", copy=False).tobytes()
    if enc is PcmEncoding.MULAW:
        return lin2ulaw(pcm).tobytes()
    return lin2alaw(pcm).tobytes()


# --------------------------------------------------------------------------- resampling


class StreamResampler:
    """Resamples a mono float32 stream chunk by chunk with one PyAV (libswresample) resampler.

    The concatenated output of ``push`` calls and a final ``flush`` equals one-shot
    ``resample`` of the whole signal. The resampler holds back a few samples of delay; only
    ``flush`` (at the end of the stream) releases them. Not thread-safe: one per stream.
    """

    def __init__(self, from_rate: int, to_rate: int) -> None:
        if from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
        self.from_rate = int(from_rate)
        self.to_rate = int(to_rate)
        self._resampler: av.AudioResampler | None = (
            None
            if self.from_rate == self.to_rate
            else av.AudioResampler(format="flt", layout="mono", rate=self.to_rate)
        )
        self._closed = False

    @property
    def passthrough(self) -> bool:
        return self._resampler is None

    def push(self, chunk: np.ndarray) -> np.ndarray:
        """Feed mono samples [n] at ``from_rate``; returns what is ready at ``to_rate``."""
        if self._closed:
            raise RuntimeError("StreamResampler.push after flush")
        if chunk.ndim != 1:
            raise ValueError(f"StreamResampler expects mono samples [n], got shape {chunk.shape}")
        x = np.ascontiguousarray(chunk, dtype=np.float32)
        if self._resampler is None:
            return x.copy()
        if x.size == 0:
            return np.zeros(0, dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
        frame.sample_rate = self.from_rate
        return _concat(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        """End of stream: returns the samples still held back. Safe to call twice."""
        if self._closed or self._resampler is None:
            self._closed = True
            return np.zeros(0, dtype=np.float32)
        self._closed = True
        return _concat(self._resampler.resample(None))


def _concat(frames: list[av.AudioFrame]) -> np.ndarray:
    parts = [f.to_ndarray().reshape(-1) for f in frames]  # packed mono: [1, n]
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)


def resample(wav: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample mono float samples [S] -> [~S * to_rate / from_rate] float32."""
    rs = StreamResampler(from_rate, to_rate)
    head = rs.push(wav)
    return np.concatenate([head, rs.flush()])
