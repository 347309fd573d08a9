"""Configuration of a Qwen3-TTS checkpoint, read from its ``config.json``.

Every shape, special id, language and speaker comes from the checkpoint. The class
defaults of the official configuration classes are not the real values, so nothing
here falls back to them silently: a key the model math needs must be present.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3tts_rt.errors import CheckpointError
from qwen3tts_rt.model.speaker import SpeakerEncoderConfig

MODEL_KINDS = ("base", "custom_voice", "voice_design")


def _need(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise CheckpointError(f"config.json: '{where}' has no '{key}'")
    return d[key]


@dataclass(frozen=True)
class DecoderStackConfig:
    """Shape of one Qwen3-style decoder stack (talker or code predictor)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool
    hidden_act: str

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> DecoderStackConfig:
        heads = int(_need(d, "num_attention_heads", where))
        hidden = int(_need(d, "hidden_size", where))
        rope_theta = d.get("rope_theta")
        if rope_theta is None:
            rope_theta = (d.get("rope_scaling") or {}).get("rope_theta", 10000.0)
        return cls(
            vocab_size=int(_need(d, "vocab_size", where)),
            hidden_size=hidden,
            intermediate_size=int(_need(d, "intermediate_size", where)),
            num_hidden_layers=int(_need(d, "num_hidden_layers", where)),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads", heads)),
            head_dim=int(d.get("head_dim") or hidden // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            attention_bias=bool(d.get("attention_bias", False)),
            hidden_act=str(d.get("hidden_act", "silu")),
        )


@dataclass(frozen=True)
class TalkerConfig:
    stack: DecoderStackConfig
    code_predictor: DecoderStackConfig
    num_code_groups: int
    text_vocab_size: int
    text_hidden_size: int
    codec_eos_id: int
    codec_pad_id: int
    codec_bos_id: int
    codec_think_id: int
    codec_nothink_id: int
    codec_think_bos_id: int
    codec_think_eos_id: int
    languages: dict[str, int]  # lower-case name -> codec language id (dialects included)
    speakers: dict[str, int]  # lower-case name -> codec speaker id
    speaker_dialects: dict[str, str | None]  # speaker -> dialect language name, None if none

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TalkerConfig:
        where = "talker_config"
        dialects_raw = d.get("spk_is_dialect") or {}
        return cls(
            stack=DecoderStackConfig.from_dict(d, where),
            code_predictor=DecoderStackConfig.from_dict(
                _need(d, "code_predictor_config", where), "talker_config.code_predictor_config"
            ),
            num_code_groups=int(_need(d, "num_code_groups", where)),
            text_vocab_size=int(_need(d, "text_vocab_size", where)),
            text_hidden_size=int(_need(d, "text_hidden_size", where)),
            codec_eos_id=int(_need(d, "codec_eos_token_id", where)),
            codec_pad_id=int(_need(d, "codec_pad_id", where)),
            codec_bos_id=int(_need(d, "codec_bos_id", where)),
            codec_think_id=int(_need(d, "codec_think_id", where)),
            codec_nothink_id=int(_need(d, "codec_nothink_id", where)),
            codec_think_bos_id=int(_need(d, "codec_think_bos_id", where)),
            codec_think_eos_id=int(_need(d, "codec_think_eos_id", where)),
            languages={k.lower(): int(v) for k, v in (d.get("codec_language_id") or {}).items()},
            speakers={k.lower(): int(v) for k, v in (d.get("spk_id") or {}).items()},
            speaker_dialects={k.lower(): (v or None) for k, v in dialects_raw.items()},
        )

    @property
    def num_codebooks(self) -> int:
        return self.num_code_groups

    @property
    def suppressed_codec_ids(self) -> list[int]:
        """Talker output ids never sampled: the 1024 specials above the codes, except EOS."""
        v = self.stack.vocab_size
        return [i for i in range(v - 1024, v) if i != self.codec_eos_id]


@dataclass(frozen=True)
class Qwen3TTSConfig:
    talker: TalkerConfig
    speaker_encoder: SpeakerEncoderConfig | None
    tts_model_type: str  # base | custom_voice | voice_design
    tts_model_size: str  # e.g. 0b6, 1b7
    tokenizer_type: str
    im_start_id: int
    im_end_id: int
    tts_pad_id: int
    tts_bos_id: int
    tts_eos_id: int
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen3TTSConfig:
        kind = str(_need(d, "tts_model_type", "config.json"))
        if kind not in MODEL_KINDS:
            raise CheckpointError(f"config.json: tts_model_type '{kind}' is not one of {MODEL_KINDS}")
        tokenizer_type = str(d.get("tokenizer_type", "qwen3_tts_tokenizer_12hz"))
        if "12hz" not in tokenizer_type:
            raise CheckpointError(
                f"config.json: tokenizer_type '{tokenizer_type}' is not supported; "
                "qwen3tts-rt serves the 12 Hz checkpoints (Qwen3-TTS-12Hz-*)"
            )
        spk = d.get("speaker_encoder_config")
        return cls(
            talker=TalkerConfig.from_dict(_need(d, "talker_config", "config.json")),
            speaker_encoder=SpeakerEncoderConfig.from_dict(spk) if kind == "base" and spk else None,
            tts_model_type=kind,
            tts_model_size=str(d.get("tts_model_size", "")),
            tokenizer_type=tokenizer_type,
            im_start_id=int(d.get("im_start_token_id", 151644)),
            im_end_id=int(d.get("im_end_token_id", 151645)),
            tts_pad_id=int(_need(d, "tts_pad_token_id", "config.json")),
            tts_bos_id=int(_need(d, "tts_bos_token_id", "config.json")),
            tts_eos_id=int(_need(d, "tts_eos_token_id", "config.json")),
            raw=copy.deepcopy(d),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Qwen3TTSConfig:
        p = Path(path) / "config.json"
        if not p.is_file():
            raise CheckpointError(f"{p} not found: not a Qwen3-TTS checkpoint directory")
        try:
            return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{p} is not valid JSON: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw)

    @property
    def languages(self) -> list[str]:
        """User-selectable languages: 'auto' plus every non-dialect language."""
        return ["auto"] + [k for k in self.talker.languages if "dialect" not in k]

    @property
    def speakers(self) -> list[str]:
        return list(self.talker.speakers)
