"""Reference-audio loading and validation, WAV I/O, PCM encodings, resampling.

Every fixture is generated here (numpy signals encoded with PyAV or ``wave``)."""

from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path

import numpy as np
import pytest

from qwen3tts_rt import errors
from qwen3tts_rt.audio import (
    PcmEncoding,
    ReferenceAudioRules,
    StreamResampler,
    encode_pcm,
    lin2alaw,
    lin2ulaw,
    load_reference_audio,
    read_wav,
    resample,
    write_wav,
)
from tests.badinput import encode, float_wav, has_encoder, speech, wav16

RATE = 24000

# --------------------------------------------------------------------------- happy paths


def test_wav16_mono_24k_loads_unchanged() -> None:
    x = speech(12.0)
    ref = load_reference_audio(wav16(x, RATE))
    assert ref.sample_rate == RATE and ref.original_sample_rate == RATE and ref.original_channels == 1
    assert ref.wav.dtype == np.float32 and ref.wav.ndim == 1
    assert ref.duration_s == pytest.approx(12.0)
    assert ref.notes == [] and ref.warnings == [] and ref.source_format == "wav"
    np.testing.assert_allclose(ref.wav, x[0], atol=1.0 / 32768)


def test_stereo_48k_is_downmixed_and_resampled_with_notes() -> None:
    x = speech(3.0, rate=48000, channels=2)
    ref = load_reference_audio(wav16(x, 48000))
    assert ref.original_sample_rate == 48000 and ref.original_channels == 2
    assert ref.sample_rate == RATE and ref.wav.shape == (3 * RATE,)
    assert any("down-mixed 2 channels" in n for n in ref.notes)
    assert any("48000 Hz to 24000 Hz" in n for n in ref.notes)
    assert any("10-20 s" in w for w in ref.warnings)  # 3 s: allowed but below the recommendation
    expected = resample(x.mean(axis=0), 48000, RATE)
    np.testing.assert_allclose(ref.wav, expected, atol=2e-4)


@pytest.mark.parametrize("codec", ["pcm_s24le", "pcm_s32le", "pcm_f32le"])
def test_wide_and_float_wav(codec: str) -> None:
    x = speech(2.0)
    ref = load_reference_audio(encode(x, RATE, "wav", codec))
    np.testing.assert_allclose(ref.wav, x[0], atol=1e-6)


@pytest.mark.parametrize(
    ("container", "codec", "rate", "kind"),
    [
        ("mp3", "libmp3lame", 24000, "mp3"),
        ("ipod", "aac", 24000, "m4a"),
        ("adts", "aac", 24000, "aac"),
        ("flac", "flac", 24000, "flac"),
        ("ogg", "libopus", 48000, "ogg"),
        ("webm", "libopus", 48000, "webm"),
    ],
)
def test_compressed_formats(container: str, codec: str, rate: int, kind: str) -> None:
    if not has_encoder(codec):
        pytest.skip(f"this PyAV build has no {codec} encoder")
    x = speech(2.0, rate=rate)
    ref = load_reference_audio(encode(x, rate, container, codec))
    assert ref.source_format == kind and ref.sample_rate == RATE
    assert ref.duration_s == pytest.approx(2.0, abs=0.1)  # codecs add priming/padding
    assert 0.05 < float(np.sqrt(np.mean(ref.wav**2))) < 0.5


def test_wrong_extension_is_irrelevant(tmp_path: Path) -> None:
    x = speech(2.0)
    path = tmp_path / "voice.mp3"
    path.write_bytes(wav16(x, RATE))
    for src in (path, str(path)):
        ref = load_reference_audio(src)
        assert ref.source_format == "wav"
        np.testing.assert_allclose(ref.wav, x[0], atol=1.0 / 32768)


def test_base64_and_data_uri() -> None:
    x = speech(1.5)
    data = wav16(x, RATE)
    b64 = base64.b64encode(data).decode()
    uri = "data:audio/wav;base64," + b64
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    for src in (b64, uri, urlsafe, wrapped):
        ref = load_reference_audio(src, allow_paths=False)
        np.testing.assert_allclose(ref.wav, x[0], atol=1.0 / 32768)


@pytest.mark.parametrize("layout", ["S", "SC", "CS", "int16"])
def test_numpy_input(layout: str) -> None:
    x = speech(2.0, channels=1 if layout in ("S", "int16") else 2)
    arr = {
        "S": x[0],
        "SC": x.T,
        "CS": x,
        "int16": np.round(x[0] * 32767).astype(np.int16),
    }[layout]
    ref = load_reference_audio(arr, sample_rate=RATE)
    assert ref.source_format == "array" and ref.wav.shape == (2 * RATE,)
    np.testing.assert_allclose(ref.wav, x.mean(axis=0), atol=1e-4)


def test_peak_above_full_scale_is_scaled_down() -> None:
    x = speech(2.0)[0] * 8
    ref = load_reference_audio(x, sample_rate=RATE)
    assert float(np.abs(ref.wav).max()) == pytest.approx(1.0)
    assert any("scaled down" in n for n in ref.notes)
    assert any("clipped" in w for w in ref.warnings)


# --------------------------------------------------------------------------- rejections


def test_low_sample_rates_are_rejected() -> None:
    for rate in (8000, 16000):
        with pytest.raises(errors.AudioSampleRateError, match=rf"{rate} Hz; at least 24000 Hz"):
            load_reference_audio(wav16(speech(2.0, rate=rate), rate))
    with pytest.raises(errors.AudioSampleRateError, match="22050 Hz"):
        load_reference_audio(speech(2.0, rate=22050)[0], sample_rate=22050)


def test_too_large_is_rejected_before_decoding(tmp_path: Path) -> None:
    big = b"RIFF" + b"\0" * (11 * 1024 * 1024)
    with pytest.raises(errors.AudioTooLargeError, match=r"11\.0 MiB; at most 10 MiB"):
        load_reference_audio(big)
    path = tmp_path / "big.wav"
    path.write_bytes(big)
    with pytest.raises(errors.AudioTooLargeError):
        load_reference_audio(path)
    with pytest.raises(errors.AudioTooLargeError):
        load_reference_audio(base64.b64encode(big).decode(), allow_paths=False)


def test_too_long_is_rejected() -> None:
    x = speech(61.0)
    with pytest.raises(errors.AudioTooLongError, match=r"longer than 60 s"):
        load_reference_audio(wav16(x, RATE))
    with pytest.raises(errors.AudioTooLongError, match=r"61\.0 s; at most 60 s"):
        load_reference_audio(x[0], sample_rate=RATE)


def test_too_short_is_rejected() -> None:
    with pytest.raises(errors.AudioTooShortError, match=r"0\.20 s; at least 1 s"):
        load_reference_audio(wav16(speech(0.2), RATE))


def test_silence_is_rejected() -> None:
    with pytest.raises(errors.AudioSilentError, match=r"silent \(peak -inf dBFS.*at least -60 dBFS"):
        load_reference_audio(wav16(np.zeros((1, 2 * RATE), np.float32), RATE))
    faint = (1e-5 * np.random.default_rng(0).standard_normal(2 * RATE)).astype(np.float32)
    with pytest.raises(errors.AudioSilentError):
        load_reference_audio(faint, sample_rate=RATE)


def test_non_finite_is_rejected() -> None:
    x = speech(2.0)[0]
    x[100] = np.nan
    with pytest.raises(errors.AudioNonFiniteError, match="1 NaN or infinite"):
        load_reference_audio(float_wav(x, RATE))
    with pytest.raises(errors.AudioNonFiniteError):
        load_reference_audio(x, sample_rate=RATE)
    x[100] = np.inf
    with pytest.raises(errors.AudioNonFiniteError):
        load_reference_audio(x, sample_rate=8000)  # non-finite is checked before anything else


def test_empty_inputs() -> None:
    for src in (b"", "", np.zeros(0, np.float32)):
        with pytest.raises(errors.AudioEmptyError):
            load_reference_audio(src, sample_rate=RATE if isinstance(src, np.ndarray) else None)
    header_only = io.BytesIO()
    write_wav(header_only, np.zeros(0, np.float32), RATE)
    with pytest.raises(errors.AudioEmptyError, match="no samples"):
        load_reference_audio(header_only.getvalue())


def test_undecodable_inputs() -> None:
    data = wav16(speech(2.0), RATE)
    with pytest.raises(errors.AudioUndecodableError, match="truncated"):
        load_reference_audio(data[: len(data) // 2])
    with pytest.raises(errors.AudioUndecodableError):
        load_reference_audio(data[:30])  # cut inside the header
    with pytest.raises(errors.AudioUndecodableError, match="supported formats: WAV"):
        load_reference_audio(np.random.default_rng(0).bytes(5000))
    mp3 = encode(speech(2.0), RATE, "mp3", "libmp3lame") if has_encoder("libmp3lame") else b"\xff\xfb"
    with pytest.raises(errors.AudioUndecodableError):
        load_reference_audio(mp3[:200] + np.random.default_rng(1).bytes(4000))
    for magic in (b"\x00\x00\x00\x1cftypM4A ", b"OggS", b"fLaC", b"ID3\x04\x00\x00\x00\x00\x00\x00"):
        with pytest.raises(errors.AudioUndecodableError):
            load_reference_audio(magic + np.random.default_rng(2).bytes(5000))
    with pytest.raises(errors.AudioUndecodableError, match="not base64"):
        load_reference_audio("/no/such/voice.wav")
    with pytest.raises(errors.AudioUndecodableError, match="neither base64"):
        load_reference_audio("not base64 at all!", allow_paths=False)
    assert issubclass(errors.AudioUndecodableError, errors.ReferenceAudioError)


def test_client_strings_never_read_files(tmp_path: Path) -> None:
    path = tmp_path / "secret.wav"
    path.write_bytes(wav16(speech(2.0), RATE))
    with pytest.raises(errors.AudioUndecodableError):
        load_reference_audio(str(path), allow_paths=False)


def test_rules_are_configurable() -> None:
    rules = ReferenceAudioRules(min_seconds=0.1, min_sample_rate=16000, max_seconds=5.0)
    ref = load_reference_audio(wav16(speech(0.5, rate=16000), 16000), rules=rules)
    assert ref.sample_rate == RATE and any("16000 Hz to 24000 Hz" in n for n in ref.notes)
    with pytest.raises(errors.AudioTooLongError, match="5 s"):
        load_reference_audio(wav16(speech(6.0), RATE), rules=rules)


def test_errors_carry_the_field() -> None:
    with pytest.raises(errors.ReferenceAudioError) as info:
        load_reference_audio(b"")
    assert info.value.field == "ref_audio" and str(info.value).startswith("ref_audio: ")


# --------------------------------------------------------------------------- WAV and encodings


def test_write_read_wav_round_trip(tmp_path: Path) -> None:
    x = speech(1.0)[0]
    path = tmp_path / "out.wav"
    write_wav(path, x, RATE)
    y, sr = read_wav(path)
    assert sr == RATE and y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, x, atol=1.0 / 32768)
    buf = io.BytesIO()
    write_wav(buf, np.array([2.0, -2.0, 0.5], np.float32), 8000)  # clipped
    y, sr = read_wav(buf.getvalue())
    assert sr == 8000
    np.testing.assert_allclose(y, [32767 / 32768, -1.0, 0.5])


def test_read_wav_float_and_stereo() -> None:
    x = speech(0.5, channels=2)
    y, sr = read_wav(encode(x, RATE, "wav", "pcm_f32le"))
    assert sr == RATE and y.shape == (x.shape[1], 2)
    np.testing.assert_allclose(y, x.T, atol=1e-7)


def _audioop():  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import audioop  # removed in Python 3.13
        except ImportError:
            return None
    return audioop


def test_g711_matches_audioop_on_every_int16() -> None:
    audioop = _audioop()
    if audioop is None:
        pytest.skip("audioop is not available in this Python")
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    raw = pcm.astype("<i2").tobytes()
    assert lin2ulaw(pcm).tobytes() == audioop.lin2ulaw(raw, 2)
    assert lin2alaw(pcm).tobytes() == audioop.lin2alaw(raw, 2)


def test_encode_pcm() -> None:
    x = np.array([0.0, 0.5, -0.5, 1.5, -1.5], np.float32)
    s16 = np.frombuffer(encode_pcm(x, PcmEncoding.PCM_S16LE), "<i2")
    np.testing.assert_array_equal(s16, [0, 16384, -16384, 32767, -32768])
    f32 = np.frombuffer(encode_pcm(x, "FLOAT32_LE"), "<f4")
    np.testing.assert_array_equal(f32, [0.0, 0.5, -0.5, 1.0, -1.0])
    for enc in (PcmEncoding.MULAW, PcmEncoding.ALAW):
        out = encode_pcm(x, enc)
        assert len(out) == x.size * enc.bytes_per_sample
    assert encode_pcm(x, PcmEncoding.MULAW)[0] == 0xFF  # mu-law zero
    assert encode_pcm(x, PcmEncoding.ALAW)[0] == 0xD5  # A-law zero


# --------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("to_rate", [8000, 16000, 22050, 24000, 44100, 48000])
def test_resample_length_and_tone(to_rate: int) -> None:
    t = np.arange(RATE) / RATE
    x = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    y = resample(x, RATE, to_rate)
    assert y.dtype == np.float32 and abs(y.size - to_rate) <= 2
    spectrum = np.abs(np.fft.rfft(y[to_rate // 10 : -to_rate // 10]))
    freqs = np.fft.rfftfreq(y.size - 2 * (to_rate // 10), 1 / to_rate)
    assert abs(freqs[spectrum.argmax()] - 1000) < 5


@pytest.mark.parametrize(("from_rate", "to_rate"), [(24000, 8000), (24000, 44100), (48000, 24000)])
def test_stream_resampler_equals_one_shot(from_rate: int, to_rate: int) -> None:
    x = speech(1.0, rate=from_rate)[0]
    whole = resample(x, from_rate, to_rate)
    rs = StreamResampler(from_rate, to_rate)
    sizes = np.random.default_rng(0).integers(1, 3000, size=100)
    bounds = np.cumsum(sizes)
    pieces = [rs.push(c) for c in np.split(x, bounds[bounds < x.size])]
    pieces.append(rs.flush())
    assert rs.flush().size == 0  # safe twice
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_stream_resampler_passthrough() -> None:
    rs = StreamResampler(RATE, RATE)
    x = speech(0.1)[0]
    assert rs.passthrough
    np.testing.assert_array_equal(rs.push(x), x)
    assert rs.flush().size == 0
