"""The talker (codebook-0 LM over codec frames) and the code predictor (codebooks 1..15).

Module and parameter names follow the official checkpoint (``talker.model.layers...``,
``talker.code_predictor.lm_head.N`` ...) so that ``model.safetensors`` loads with
``strict=True``. The modules are stateless; KV caches are passed in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qwen3tts_rt.model.config import DecoderStackConfig, Qwen3TTSConfig, TalkerConfig
from qwen3tts_rt.model.layers import DecoderStack, KVCache, activation
from qwen3tts_rt.model.speaker import SpeakerEncoder


class TalkerBackbone(DecoderStack):
    def __init__(self, cfg: TalkerConfig) -> None:
        super().__init__(cfg.stack)
        self.codec_embedding = nn.Embedding(cfg.stack.vocab_size, cfg.stack.hidden_size)
        self.text_embedding = nn.Embedding(cfg.text_vocab_size, cfg.text_hidden_size)


class TextProjection(nn.Module):
    def __init__(self, text_hidden: int, hidden: int, act: str) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(text_hidden, text_hidden, bias=True)
        self.linear_fc2 = nn.Linear(text_hidden, hidden, bias=True)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class CodePredictorBackbone(DecoderStack):
    def __init__(self, cfg: DecoderStackConfig, num_groups: int, talker_hidden: int) -> None:
        super().__init__(cfg)
        self.codec_embedding = nn.ModuleList(
            [nn.Embedding(cfg.vocab_size, talker_hidden) for _ in range(num_groups - 1)]
        )


class CodePredictor(nn.Module):
    """Given the talker's last hidden state and codebook 0 of a frame, predicts
    codebooks 1..G-1 autoregressively (G-1 small steps per frame)."""

    def __init__(self, cfg: TalkerConfig) -> None:
        super().__init__()
        cp = cfg.code_predictor
        self.num_groups = cfg.num_code_groups
        self.model = CodePredictorBackbone(cp, cfg.num_code_groups, cfg.stack.hidden_size)
        self.lm_head = nn.ModuleList(
            [nn.Linear(cp.hidden_size, cp.vocab_size, bias=False) for _ in range(cfg.num_code_groups - 1)]
        )
        self.small_to_mtp_projection: nn.Module
        if cp.hidden_size != cfg.stack.hidden_size:
            self.small_to_mtp_projection = nn.Linear(cfg.stack.hidden_size, cp.hidden_size, bias=True)
        else:
            self.small_to_mtp_projection = nn.Identity()

    def predict(
        self,
        talker_hidden: torch.Tensor,  # [B, H_talker]: talker output at the position that produced c0
        c0_embed: torch.Tensor,  # [B, H_talker]: talker codec embedding of codebook 0
        choose: Callable[[torch.Tensor, int], torch.Tensor],  # (logits [B, V] f32, group j) -> ids [B]
        cache: KVCache,
    ) -> torch.Tensor:
        """Returns codebooks 1..G-1 as [B, G-1]. ``cache`` needs B slots and G+1 positions;
        it is scratch space (overwritten from position 0 every frame)."""
        b = talker_hidden.shape[0]
        dev = talker_hidden.device
        slots = torch.arange(b, device=dev)
        x = self.small_to_mtp_projection(torch.stack([talker_hidden, c0_embed], dim=1))  # [B, 2, h]
        lengths = torch.zeros(b, dtype=torch.long, device=dev)
        out = []
        for j in range(self.num_groups - 1):
            h = self.model(x, cache, slots, lengths)
            lengths = lengths + x.shape[1]
            ids = choose(self.lm_head[j](h[:, -1]).float(), j + 1)  # [B]
            out.append(ids)
            if j + 1 < self.num_groups - 1:
                x = self.small_to_mtp_projection(self.model.codec_embedding[j](ids))[:, None]
        return torch.stack(out, dim=1)


class Talker(nn.Module):
    def __init__(self, cfg: TalkerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = TalkerBackbone(cfg)
        self.text_projection = TextProjection(
            cfg.text_hidden_size, cfg.stack.hidden_size, cfg.stack.hidden_act
        )
        self.codec_head = nn.Linear(cfg.stack.hidden_size, cfg.stack.vocab_size, bias=False)
        self.code_predictor = CodePredictor(cfg)


class Qwen3TTSModel(nn.Module):
    """The checkpoint's ``model.safetensors``: talker (+ speaker encoder on Base models).

    Stateless math used by the engine:
    ``text_embed`` / ``codec_embed`` / ``frame_embed`` build talker inputs,
    ``talker_forward`` runs positions against a KV cache, ``codec_logits`` scores
    codebook 0, ``code_predictor.predict`` completes a frame.
    """

    def __init__(self, cfg: Qwen3TTSConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.talker = Talker(cfg.talker)
        self.speaker_encoder: SpeakerEncoder | None = None
        if cfg.speaker_encoder is not None:
            self.speaker_encoder = SpeakerEncoder(cfg.speaker_encoder)

    @property
    def device(self) -> torch.device:
        return self.talker.codec_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.talker.codec_head.weight.dtype

    def text_embed(self, ids: torch.Tensor) -> torch.Tensor:
        # ids [..., T] -> [..., T, H]
        return self.talker.text_projection(self.talker.model.text_embedding(ids))

    def codec_embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.talker.model.codec_embedding(ids)

    def frame_embed(self, frames: torch.Tensor) -> torch.Tensor:
        """Sum of the G codebook embeddings of each frame: [..., G] -> [..., H]."""
        parts = [self.codec_embed(frames[..., 0])]
        emb = self.talker.code_predictor.model.codec_embedding
        parts += [emb[j - 1](frames[..., j]) for j in range(1, frames.shape[-1])]
        return torch.stack(parts, dim=-2).sum(-2)

    def talker_forward(
        self, x: torch.Tensor, cache: KVCache, slots: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        return self.talker.model(x, cache, slots, lengths)

    def codec_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.talker.codec_head(hidden).float()

    def new_talker_cache(self, slots: int, capacity: int = 256) -> KVCache:
        return KVCache.allocate(self.cfg.talker.stack, slots, capacity, self.device, self.dtype)

    def new_predictor_cache(self, slots: int) -> KVCache:
        cap = self.cfg.talker.num_code_groups + 1
        return KVCache.allocate(self.cfg.talker.code_predictor, slots, cap, self.device, self.dtype)
