"""Official-layout checkpoints: find (local dir, hub cache, or download), load, and
write random-weight ones for tests and benchmarks.

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
from safetensors.torch import load_file, save_file
from torch import nn

from qwen3tts_rt.errors import CheckpointError, ModelUnavailableError
from qwen3tts_rt.model import codec as codec_mod
from qwen3tts_rt.model import speaker as speaker_mod
from qwen3tts_rt.model.codec import SpeechTokenizer
from qwen3tts_rt.model.config import Qwen3TTSConfig
from qwen3tts_rt.model.talker import Qwen3TTSModel
from qwen3tts_rt.model.text_tokenizer import TextTokenizer, write_tokenizer_files

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


# --------------------------------------------------------------------------- random checkpoints

LANGUAGES = {
    "chinese": 2055,
    "english": 2050,
    "german": 2053,
    "spanish": 2054,
    "japanese": 2058,
    "french": 2061,
    "korean": 2064,
    "russian": 2069,
    "italian": 2070,
    "portuguese": 2071,
}
DIALECTS = {"beijing_dialect": 2074, "sichuan_dialect": 2062}
SPEAKERS = {
    "vivian": (3065, None),
    "serena": (3066, None),
    "uncle_fu": (3010, None),
    "dylan": (2878, "beijing_dialect"),
    "eric": (2875, "sichuan_dialect"),
    "ryan": (3061, None),
    "aiden": (2861, None),
    "ono_anna": (2873, None),
    "sohee": (2864, None),
}

# talker width, layers, heads, kv heads, head_dim, intermediate; code predictor the same;
# text width; model size tag
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        talker=(32, 2, 2, 1, 16, 64),
        predictor=(24, 2, 2, 1, 12, 48),
        text_hidden=8,
        size="0b6",
    ),
    "0.6b": dict(
        talker=(1024, 28, 16, 8, 128, 3072),
        predictor=(1024, 5, 16, 8, 128, 3072),
        text_hidden=2048,
        size="0b6",
    ),
    "1.7b": dict(
        talker=(2048, 28, 16, 8, 128, 6144),
        predictor=(1024, 5, 16, 8, 128, 3072),
        text_hidden=2048,
        size="1b7",
    ),
}


def _stack_dict(shape: tuple[int, ...], vocab: int, theta: float) -> dict[str, Any]:
    hidden, layers, heads, kv, head_dim, inter = shape
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "sliding_window": None,
    }


def preset_config(preset: str, kind: str) -> dict[str, Any]:
    """config.json content for a random-weight checkpoint of the given shape and kind."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    hidden, head_dim = p["talker"][0], p["talker"][4]
    half = head_dim // 2
    mrope = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]  # 64 -> [24, 20, 20]
    talker = _stack_dict(p["talker"], 3072, 1_000_000.0)
    talker["rope_scaling"] = {
        "interleaved": True,
        "mrope_section": mrope,
        "rope_type": "default",
        "type": "default",
    }
    predictor = _stack_dict(p["predictor"], 2048, 1_000_000.0)
    predictor.update(model_type="qwen3_tts_talker_code_predictor", num_code_groups=16, rope_scaling=None)
    languages = dict(LANGUAGES)
    speakers: dict[str, int] = {}
    dialects: dict[str, Any] = {}
    if kind == "custom_voice":
        languages.update(DIALECTS)
        speakers = {k: v[0] for k, v in SPEAKERS.items()}
        dialects = {k: (v[1] or False) for k, v in SPEAKERS.items()}
    talker.update(
        model_type="qwen3_tts_talker",
        code_predictor_config=predictor,
        num_code_groups=16,
        text_hidden_size=p["text_hidden"],
        text_vocab_size=151936,
        codec_eos_token_id=2150,
        codec_think_id=2154,
        codec_nothink_id=2155,
        codec_think_bos_id=2156,
        codec_think_eos_id=2157,
        codec_pad_id=2148,
        codec_bos_id=2149,
        codec_language_id=languages,
        spk_id=speakers,
        spk_is_dialect=dialects,
    )
    cfg: dict[str, Any] = {
        "architectures": ["Qwen3TTSForConditionalGeneration"],
        "model_type": "qwen3_tts",
        "tokenizer_type": "qwen3_tts_tokenizer_12hz",
        "tts_model_size": p["size"],
        "tts_model_type": kind,
        "im_start_token_id": 151644,
        "im_end_token_id": 151645,
        "tts_pad_token_id": 151671,
        "tts_bos_token_id": 151672,
        "tts_eos_token_id": 151673,
        "talker_config": talker,
        "torch_dtype": "float32",
        # transformers 4.57.3 (the official package's pin) swaps in another pre-tokenizer
        # regex for local directories without a version at or below 4.57.2; name one so
        # that the official package tokenizes these checkpoints as hub downloads are.
        "transformers_version": "4.57.1",
        "qwen3tts_rt_random_weights": {"preset": preset},
    }
    if kind == "base":
        tiny = preset == "tiny"
        spk = (
            speaker_mod.SpeakerEncoderConfig.tiny(hidden)
            if tiny
            else speaker_mod.SpeakerEncoderConfig(enc_dim=hidden)
        )
        cfg["speaker_encoder_config"] = spk.to_dict()
    return cfg


GENERATION_CONFIG = {
    "do_sample": True,
    "repetition_penalty": 1.05,
    "temperature": 0.9,
    "top_p": 1.0,
    "top_k": 50,
    "subtalker_dosample": True,
    "subtalker_temperature": 0.9,
    "subtalker_top_k": 50,
    "subtalker_top_p": 1.0,
    "max_new_tokens": 8192,
}


@torch.no_grad()
def init_random_talker_(model: Qwen3TTSModel, generator: torch.Generator) -> None:
    """Fan-in scaled weights and unit-variance embeddings, so that every input (text,
    speaker, language, reference frames) visibly moves the output: a test on these
    weights fails if any of them is wired wrongly."""
    for name, p in model.named_parameters():
        if name.startswith("speaker_encoder."):
            continue
        noise = torch.randn(p.shape, generator=generator)
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith(".bias"):
            p.copy_(0.1 * noise)
        elif "embedding" in name:
            p.copy_(noise)
        else:  # Linear [out, in]
            p.copy_(noise / p.shape[1] ** 0.5)


def make_checkpoint(
    out: str | os.PathLike[str], *, preset: str = "tiny", kind: str = "base", seed: int = 0
) -> Path:
    """Write a random-weight checkpoint in the official layout; returns its path."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_dict = preset_config(preset, kind)
    cfg = Qwen3TTSConfig.from_dict(cfg_dict)
    g = torch.Generator().manual_seed(seed)
    model = Qwen3TTSModel(cfg)
    init_random_talker_(model, g)
    if model.speaker_encoder is not None:
        speaker_mod.init_random_speaker_encoder_(model.speaker_encoder, seed + 1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg_dict, indent=2), encoding="utf-8")
    (out_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2), encoding="utf-8")
    codec_cfg = codec_mod.tiny_codec_config() if preset == "tiny" else codec_mod.full_codec_config()
    codec = SpeechTokenizer(codec_cfg)  # the official speech tokenizer always ships its encoder
    codec_mod.init_random_codec_(codec, seed + 2)
    codec.save_pretrained(out_dir / "speech_tokenizer")
    write_tokenizer_files(out_dir)
    return out_dir
