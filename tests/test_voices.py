"""Voice clone prompts: computed once, saved and reused, cached by content."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest

from qwen3tts_rt.api import Qwen3TTS
from qwen3tts_rt.audio import write_wav
from qwen3tts_rt.engine.voices import VoiceClonePrompt, create_voice_clone_prompt
from qwen3tts_rt.errors import AudioSampleRateError, MissingReferenceTextError, UnsupportedOperationError

DATA = Path(__file__).parent / "reference" / "data"


@pytest.fixture(scope="module")
def tts(ref_checkpoint_dirs: dict[str, Path]) -> Qwen3TTS:
    return Qwen3TTS.from_pretrained(str(ref_checkpoint_dirs["tiny-base"]))


@pytest.fixture(scope="module")
def wav_bytes() -> bytes:
    buf = io.BytesIO()
    write_wav(buf, np.load(DATA / "ref_audio.npy"), 24000)
    return buf.getvalue()


def test_every_input_form_gives_the_same_prompt(tts: Qwen3TTS, wav_bytes: bytes, tmp_path: Path) -> None:
    path = tmp_path / "ref.wav"
    path.write_bytes(wav_bytes)
    audio = np.load(DATA / "ref_audio.npy")
    int16 = np.round(np.clip(audio, -1, 1) * 32767) / 32767  # what the WAV holds
    forms = [
        str(path),
        wav_bytes,
        base64.b64encode(wav_bytes).decode(),
    ]
    prompts = [tts.create_voice_clone_prompt(f, ref_text="Hello there.") for f in forms]
    from_array = tts.create_voice_clone_prompt(int16.astype(np.float32), "Hello there.", sample_rate=24000)
    for p in [*prompts[1:], from_array]:
        np.testing.assert_allclose(
            p.speaker_embedding.numpy(), prompts[0].speaker_embedding.numpy(), atol=1e-5
        )
        assert p.ref_codes is not None and prompts[0].ref_codes is not None
        np.testing.assert_array_equal(p.ref_codes.numpy(), prompts[0].ref_codes.numpy())


def test_saved_prompt_is_reused_without_reencoding(tts: Qwen3TTS, wav_bytes: bytes, tmp_path: Path) -> None:
    prompt = tts.create_voice_clone_prompt(wav_bytes, ref_text="Hello there.")
    f = tmp_path / "voice.safetensors"
    prompt.save(f)
    again = VoiceClonePrompt.load(f)
    assert again.content_hash() == prompt.content_hash()
    assert again.model_fingerprint == prompt.model_fingerprint != ""
    kw = dict(do_sample=False, subtalker_dosample=False, max_new_tokens=6)
    a, _ = tts.generate_voice_clone("Reuse me.", "english", voice_clone_prompt=prompt, **kw)
    b, _ = tts.generate_voice_clone(["Reuse me.", "Twice."], "english", voice_clone_prompt=again, **kw)
    np.testing.assert_array_equal(a[0], b[0])
    assert len(b) == 2 and not np.array_equal(b[0], b[1])


def test_clone_rules(tts: Qwen3TTS, wav_bytes: bytes, ref_checkpoint_dirs: dict[str, Path]) -> None:
    with pytest.raises(MissingReferenceTextError, match="ref_text"):
        tts.create_voice_clone_prompt(wav_bytes)  # ICL needs the transcript
    xvec = tts.create_voice_clone_prompt(wav_bytes, x_vector_only_mode=True)
    assert xvec.ref_codes is None and xvec.x_vector_only
    low = np.zeros(16000, np.float32)
    with pytest.raises(AudioSampleRateError, match="24000"):
        tts.create_voice_clone_prompt(low, x_vector_only_mode=True, sample_rate=8000)
    custom = Qwen3TTS.from_pretrained(str(ref_checkpoint_dirs["tiny-custom"]))
    with pytest.raises(UnsupportedOperationError, match="Base"):
        create_voice_clone_prompt(custom.ckpt, wav_bytes, None, x_vector_only=True)
