"""Exactness against the OFFICIAL qwen-tts package on the same random weights.

``tests/reference/data`` was produced by ``make reference`` (tests/reference/
run_reference.sh): the official package, in its own venv, ran greedy generation on the
tiny checkpoints that ``tests.reference.checkpoints`` builds. Here the same checkpoints
are rebuilt (their weight hashes must match the manifest) and qwen3tts-rt must give the
same codec frames, the same waveforms (<= 1e-4) and the same speaker embeddings, in both
official layouts (``<case>_whole``: ``non_streaming_mode=True``, ``<case>_dual``: False).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3tts_rt import cli
from qwen3tts_rt.api import Qwen3TTS
from qwen3tts_rt.engine.voices import create_voice_clone_prompt, voice_prompt
from tests.reference.checkpoints import weights_hash

DATA = Path(__file__).parent / "reference" / "data"
MANIFEST = json.loads((DATA / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def models(ref_checkpoint_dirs: dict[str, Path]) -> dict[str, Qwen3TTS]:
    dirs = ref_checkpoint_dirs
    for name, d in dirs.items():
        if name in MANIFEST["checkpoints"]:
            assert weights_hash(d) == MANIFEST["checkpoints"][name], (
                f"{name}: the checkpoint generator changed since the reference data was made; "
                "run `make reference` to regenerate tests/reference/data"
            )
    return {name: Qwen3TTS.from_pretrained(str(d)) for name, d in dirs.items()}


def _greedy() -> dict[str, object]:
    g = MANIFEST["greedy"]
    return {
        "do_sample": g["do_sample"],
        "subtalker_dosample": g["subtalker_dosample"],
        "max_new_tokens": g["max_new_tokens"],
    }


@pytest.mark.parametrize("case", sorted(MANIFEST["cases"]))
def test_matches_official(case: str, models: dict[str, Qwen3TTS]) -> None:
    spec = MANIFEST["cases"][case]
    ref = np.load(DATA / f"{case}.npz")
    tts = models[spec["checkpoint"]]
    kw = dict(spec["kwargs"])
    if spec["method"] == "custom":
        voice = voice_prompt(tts.ckpt, speaker=kw["speaker"], instruct=kw.get("instruct"))
    elif spec["method"] == "design":
        voice = voice_prompt(tts.ckpt, instruct=kw["instruct"])
    else:
        audio = np.load(DATA / "ref_audio.npy")
        prompt = create_voice_clone_prompt(
            tts.ckpt,
            audio,
            kw.get("ref_text"),
            x_vector_only=bool(kw.get("x_vector_only_mode")),
            sample_rate=24000,
        )
        emb = ref["speaker_embedding"]
        rel = np.abs(prompt.speaker_embedding.numpy() - emb).max() / np.abs(emb).max()
        assert rel <= 1e-5, f"speaker embedding differs: relative {rel:.2e}"
        if "ref_codes" in ref:
            assert prompt.ref_codes is not None
            np.testing.assert_array_equal(prompt.ref_codes.numpy(), ref["ref_codes"])
        voice = voice_prompt(tts.ckpt, clone=prompt)
    res = tts.synthesize(kw["text"], kw["language"], voice, spec["non_streaming_mode"], **_greedy())
    np.testing.assert_array_equal(res.frames.numpy(), ref["codes"], err_msg=f"{case}: codec frames differ")
    off = ref["wav"]
    n = min(len(off), len(res.wav))
    assert abs(len(off) - len(res.wav)) <= 1, (len(off), len(res.wav))
    # the official cuts the reference part off at int(ref/total * samples): align the ends
    diff = np.abs(res.wav[len(res.wav) - n :] - off[len(off) - n :]).max()
    assert diff <= 1e-4, f"{case}: waveform max abs diff {diff:.2e}"
    assert np.abs(res.wav).max() > 1e-3, "silent output"


def test_reference_data_is_not_trivial() -> None:
    codes = [np.load(DATA / f"{c}.npz")["codes"] for c in MANIFEST["cases"]]
    assert all(c.shape[0] >= 5 and c.shape[1] == 16 for c in codes)
    # different voices/texts give different frames: the comparison is not vacuous
    assert len({c.tobytes() for c in codes}) == len(codes)
    assert torch.tensor(codes[0]).unique().numel() > 10


def test_reference_data_covers_both_layouts_for_every_kind() -> None:
    cases = MANIFEST["cases"]
    stems = {c.rsplit("_", 1)[0] for c in cases}
    for stem in stems:
        assert cases[f"{stem}_whole"]["non_streaming_mode"] is True
        assert cases[f"{stem}_dual"]["non_streaming_mode"] is False
    kinds = {
        (cases[f"{s}_whole"]["method"], "instruct" in cases[f"{s}_whole"]["kwargs"], s.split("_")[0])
        for s in stems
    }
    assert {("custom", False, "custom"), ("custom", True, "custom"), ("design", True, "design")} <= kinds
    assert {"xvec", "icl"} <= {k[2] for k in kinds}


@pytest.mark.parametrize("method", ["custom", "design", "clone"])
def test_official_api_defaults_pick_the_official_layout(method: str, models: dict[str, Qwen3TTS]) -> None:
    """``generate_*`` without ``non_streaming_mode`` gives the official default call's
    output: whole text for custom voice and voice design, dual-track for clones."""
    case = {"custom": "custom_en", "design": "design_en", "clone": "xvec_en"}[method]
    layout = "dual" if method == "clone" else "whole"
    spec = MANIFEST["cases"][f"{case}_{layout}"]
    kw = dict(spec["kwargs"])
    tts = models[spec["checkpoint"]]
    if method == "custom":
        wavs, _ = tts.generate_custom_voice(kw["text"], kw["language"], kw["speaker"], **_greedy())
    elif method == "design":
        wavs, _ = tts.generate_voice_design(kw["text"], kw["language"], kw["instruct"], **_greedy())
    else:
        audio = np.load(DATA / "ref_audio.npy")
        prompt = tts.create_voice_clone_prompt(audio, None, x_vector_only_mode=True, sample_rate=24000)
        wavs, _ = tts.generate_voice_clone(kw["text"], kw["language"], voice_clone_prompt=prompt, **_greedy())
    off = np.load(DATA / f"{case}_{layout}.npz")["wav"]
    assert len(wavs[0]) == len(off)
    assert np.abs(wavs[0] - off).max() <= 1e-4


@pytest.mark.parametrize("flag", [None, "--non-streaming-mode", "--no-non-streaming-mode"])
def test_synth_cli_layout_follows_the_official_default(
    flag: str | None, ref_checkpoint_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """``qwen3tts-rt synth`` on a CustomVoice checkpoint: without the flag, the official
    default call's frames (whole text); with it, the layout it names."""
    layout = "dual" if flag == "--no-non-streaming-mode" else "whole"
    spec = MANIFEST["cases"][f"custom_en_{layout}"]
    kw = spec["kwargs"]
    codes = tmp_path / "codes.npy"
    argv = ["synth", "--model", str(ref_checkpoint_dirs[spec["checkpoint"]]), "--speaker", kw["speaker"]]
    argv += ["--language", kw["language"], "--text", kw["text"], "--greedy"]
    argv += ["--max-new-tokens", str(MANIFEST["greedy"]["max_new_tokens"])]
    argv += ["--out", str(tmp_path / "out.wav"), "--codes-out", str(codes)]
    assert cli.main(argv + ([flag] if flag else [])) == 0
    np.testing.assert_array_equal(np.load(codes), np.load(DATA / f"custom_en_{layout}.npz")["codes"])
