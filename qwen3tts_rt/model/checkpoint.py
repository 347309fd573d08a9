"""Official-layout checkpoints: find (local dir, hub cache, or download) and load.
Random-weight ones for tests, benchmarks and the demo are made by
``qwen3tts_rt.model.fabricate``.

Layout (as on the hub, e.g. ``Qwen/Qwen3-TTS-12Hz-0.6B-Base``)::

    config.json  generation_config.json  model.safetensors
    vocab.json  merges.txt  tokenizer_config.json  ...
    speech_tokenizer/{config.json, model.safetensors, preprocessor_config.json}
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from qwen3tts_rt.errors import CheckpointError, ModelUnavailableError
from qwen3tts_rt.model.codec import SpeechTokenizer
from qwen3tts_rt.model.config import Qwen3TTSConfig
from qwen3tts_rt.model.talker import Qwen3TTSModel
from qwen3tts_rt.model.text_tokenizer import TextTokenizer

log = logging.getLogger(__name__)

OFFICIAL_MODELS = (
    "Qwen/Qwen3-TTS-12Hz-0.6B-Base",
    "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice",
    "Qwen/Qwen3-TTS-12Hz-1.7B-Base",
    "Qwen/Qwen3-TTS-12Hz-1.7B-CustomVoice",
    "Qwen/Qwen3-TTS-12Hz-1.7B-VoiceDesign",
)
REQUIRED_FILES = ("config.json", "model.safetensors", "speech_tokenizer/config.json")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got '{name}'") from None


# --------------------------------------------------------------------------- locating


def resolve_checkpoint(path_or_id: str | os.PathLike[str], *, revision: str | None = None) -> Path:
    """A local checkpoint directory for ``path_or_id``: the directory itself, the hub
    cache, or a download (with a progress bar). Offline without a cached copy, the error
    says what to do."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        _check_layout(p)
        return p
    repo_id = str(path_or_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise ModelUnavailableError(
            f"'{repo_id}' is neither a checkpoint directory nor a hub id like 'Qwen/Qwen3-TTS-12Hz-0.6B-Base'"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        local = snapshot_download(repo_id, revision=revision, local_files_only=True)
        _check_layout(Path(local))
        return Path(local)
    except (LocalEntryNotFoundError, CheckpointError, FileNotFoundError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelUnavailableError(_offline_message(repo_id, "HF_HUB_OFFLINE is set"))
    log.info("downloading %s from the Hugging Face hub", repo_id)
    try:
        local = snapshot_download(repo_id, revision=revision)
    except Exception as e:  # network errors come in many classes; all mean the same here
        raise ModelUnavailableError(_offline_message(repo_id, f"{type(e).__name__}: {e}")) from e
    _check_layout(Path(local))
    return Path(local)


def _offline_message(repo_id: str, why: str) -> str:
    return (
        f"model '{repo_id}' is not in the local hub cache and could not be downloaded ({why}).\n"
        f"Either: download it on a connected machine (`huggingface-cli download {repo_id}`) and copy "
        "the hub cache (~/.cache/huggingface/hub) here; or pass --model with a local checkpoint directory; "
        "or, to try the software without real weights, make a random-weight checkpoint: "
        "`qwen3tts-rt make-checkpoint --preset tiny --kind base --out checkpoints/tiny-base`."
    )


def _check_layout(p: Path) -> None:
    missing = [f for f in REQUIRED_FILES if not (p / f).is_file()]
    if missing:
        raise CheckpointError(f"{p} is not a Qwen3-TTS checkpoint: missing {', '.join(missing)}")


# --------------------------------------------------------------------------- loading


@dataclass
class Checkpoint:
    path: Path
    config: Qwen3TTSConfig
    generation_config: dict[str, Any]
    model: Qwen3TTSModel
    codec: SpeechTokenizer
    tokenizer: TextTokenizer


def load_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{what}: weights do not match the configuration "
            f"(missing {result.missing_keys[:5]}..., unexpected {result.unexpected_keys[:5]}...)"
        )


def load_checkpoint(
    path_or_id: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    codec_dtype: str | torch.dtype = "float32",
) -> Checkpoint:
    """Load talker (+ speaker encoder), codec and text tokenizer. The codec runs in
    ``codec_dtype`` (float32 by default: it is small and its output is audio)."""
    path = resolve_checkpoint(path_or_id)
    dev = torch.device(device)
    cfg = Qwen3TTSConfig.from_dir(path)
    gen_path = path / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    model = Qwen3TTSModel(cfg)
    load_state(model, load_file(str(path / "model.safetensors")), f"{path}/model.safetensors")
    model = model.to(dev, parse_dtype(dtype)).eval()
    codec = SpeechTokenizer.from_pretrained(
        path / "speech_tokenizer", device=dev, dtype=parse_dtype(codec_dtype)
    )
    tokenizer = TextTokenizer.from_dir(path)
    return Checkpoint(path, cfg, gen, model, codec, tokenizer)
