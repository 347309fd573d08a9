"""Streaming decoder states for a pool of session slots, stepped as one batch.

Each slot holds one stream's ``CodecDecoderState`` (row ``slot`` of pooled tensors; the
last row is a scratch slot for padding). A step gathers the rows of the sessions whose
frames leave now, runs ``CodecDecoder.decode_step`` on them together (t frames per row,
the same t for every row of one step) and writes the new states back, in place: the
pooled tensors are never reallocated, so the step can be captured as a CUDA graph per
(batch bucket, t) (see ``cuda_graphs``).
"""

from __future__ import annotations

import torch

from qwen3tts_rt.model.codec import CodecDecoder, CodecDecoderState
from qwen3tts_rt.model.cuda_graphs import FastPath, StepCache


class DecoderPool:
    def __init__(
        self, decoder: CodecDecoder, slots: int, fast: FastPath, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.decoder = decoder
        self.slots = slots
        self.scratch = slots
        self.fast = fast
        self.device = device
        self.state = decoder.new_state(slots + 1, device, dtype)
        self._steps = StepCache(fast)

    def _tensors(self, st: CodecDecoderState) -> list[torch.Tensor]:
        return [st.position, *st.keys, *st.values, *st.conv_history]

    def _gather(self, idx: torch.Tensor) -> CodecDecoderState:
        s = self.state
        return CodecDecoderState(
            position=s.position[idx],
            keys=[k[idx] for k in s.keys],
            values=[v[idx] for v in s.values],
            conv_history=[h[idx] for h in s.conv_history],
        )

    def _scatter(self, idx: torch.Tensor, st: CodecDecoderState) -> None:
        for dst, src in zip(self._tensors(self.state), self._tensors(st)):
            dst.index_copy_(0, idx, src)

    def _step(self, idx: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        # idx [B] long, codes [B, t, Q] -> [B, t * samples_per_frame]
        st = self._gather(idx)
        wav = self.decoder.decode_step(codes, st)
        self._scatter(idx, st)
        return wav

    @torch.inference_mode()
    def reset(self, slot: int) -> None:
        """Slot ``slot`` starts a new stream."""
        for t in self._tensors(self.state):
            t[slot].zero_()

    @torch.inference_mode()
    def prime(self, slot: int, codes: torch.Tensor) -> None:
        """Decode ``codes`` [R, Q] into slot ``slot``'s state and drop the audio (the decoder
        continues from a reference recording)."""
        idx = torch.tensor([slot], device=self.device)
        self._step(idx, codes[None].to(self.device))

    @torch.inference_mode()
    def step(self, slots: list[int], codes: torch.Tensor) -> torch.Tensor:
        """The next t frames of each of ``slots``: codes [n, t, Q] -> waveform
        [n, t * samples_per_frame]."""
        n, t = len(slots), codes.shape[1]
        size = self.fast.bucket(n, self.slots)
        idx = torch.tensor(slots + [self.scratch] * (size - n), device=self.device)
        codes = codes.to(self.device)
        if size > n:
            codes = torch.cat([codes, codes.new_zeros((size - n, *codes.shape[1:]))])
        if not self.fast.captured:
            return self._step(idx, codes)[:n]
        step = self._steps.get(
            f"decoder{t}", size, self._step, lambda: self._example(size, t, codes.shape[-1])
        )
        return step(idx, codes)[:n]

    def _example(self, size: int, t: int, q: int) -> list[torch.Tensor]:
        idx = torch.full((size,), self.scratch, dtype=torch.long, device=self.device)
        return [idx, torch.zeros((size, t, q), dtype=torch.long, device=self.device)]

    @torch.inference_mode()
    def warmup(self, frame_counts: range | list[int] = range(1, 2)) -> None:
        """Capture the step of every bucket for each t in ``frame_counts`` (no-op unless the
        steps are captured)."""
        if not self.fast.captured:
            return
        q = self.decoder.config.num_quantizers
        for t in frame_counts:
            for size in self.fast.bucket_list(self.slots):
                self._steps.get(f"decoder{t}", size, self._step, lambda s=size, t=t: self._example(s, t, q))  # type: ignore[misc]
