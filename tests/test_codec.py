"""The 12 Hz codec on the tiny preset with random fp32 weights.

Streaming decode equals one-shot decode for any packetisation, batched streams equal single ones,
checkpoints round-trip, the encoder's frame count follows the official rule, and the official
`chunked_decode` scheme measurably deviates where the stateful decoder does not.
(Agreement with the official package itself is checked outside this suite, in its own venv.)
Whole file: ~30 s on 2 CPU cores (one thread); the 310 one-frame steps take ~5 s of it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from qwen3tts_rt.errors import CheckpointError, UnsupportedOperationError
from qwen3tts_rt.model.codec import CodecConfig, CodecDecoder, CodecDecoderState, SpeechTokenizer
from qwen3tts_rt.model.fabricate import full_codec_config, init_random_codec_, tiny_codec_config

LONG = 310  # frames: past the official 300-frame chunk and well past the 72-frame attention window
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model's ops are too small to gain from threads; with several, a busy core
    (another process) stalls every op at the thread barrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def codec() -> SpeechTokenizer:
    model = SpeechTokenizer(tiny_codec_config()).eval()
    init_random_codec_(model, seed=7)
    return model


@pytest.fixture(scope="module")
def codes() -> Tensor:
    return torch.randint(0, 2048, (2, LONG, 16), generator=torch.Generator().manual_seed(0))  # [B, T, Q]


@pytest.fixture(scope="module")
def exact(codec: SpeechTokenizer, codes: Tensor) -> Tensor:
    return codec.decoder.decode(codes)  # [B, T * 1920]


def stream(decoder: CodecDecoder, codes: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """Feeds codes [B, T, Q] to a new stream in packets of the given sizes (cycled); returns the audio."""
    state, pieces, start = decoder.new_state(codes.shape[0]), [], 0
    for size in itertools.cycle(sizes):
        if start >= codes.shape[1]:
            break
        pieces.append(decoder.decode_step(codes[:, start : start + size], state))
        start += size
    return torch.cat(pieces, dim=-1)


@pytest.mark.parametrize("sizes", [(1,), (2,), (3,), (4,), (7,), (25,), (1, 5, 2, 30, 3)])
def test_streaming_equals_one_shot(
    codec: SpeechTokenizer, codes: Tensor, exact: Tensor, sizes: tuple[int, ...]
):
    decoder = codec.decoder
    streamed = stream(decoder, codes, sizes)
    assert streamed.shape == exact.shape == (2, LONG * decoder.samples_per_frame)
    assert (streamed - exact).abs().max().item() < TOL


def test_batched_streams_equal_single_streams(codec: SpeechTokenizer):
    decoder = codec.decoder
    gen = torch.Generator().manual_seed(1)
    prefixes = [0, 9, 90]  # frames each session has already decoded (the last is past the window)
    singles = []
    for n in prefixes:
        state = decoder.new_state(1)
        if n:
            decoder.decode_step(torch.randint(0, 2048, (1, n, 16), generator=gen), state)
        singles.append(state)
    batch = CodecDecoderState.stack(singles)
    assert batch.position.tolist() == prefixes
    for t in (1, 4, 2):
        step = torch.randint(0, 2048, (3, t, 16), generator=gen)
        together = decoder.decode_step(step, batch)
        for i, state in enumerate(singles):
            alone = decoder.decode_step(step[i : i + 1], state)
            assert (together[i : i + 1] - alone).abs().max().item() < TOL
    # The split states continue each stream exactly as the single states do.
    step = torch.randint(0, 2048, (1, 3, 16), generator=gen)
    for part, state in zip(batch.split(), singles):
        assert part.position.tolist() == state.position.tolist()
        assert (decoder.decode_step(step, part) - decoder.decode_step(step, state)).abs().max().item() < TOL


def test_reset_starts_a_new_stream(codec: SpeechTokenizer, codes: Tensor, exact: Tensor):
    decoder = codec.decoder
    state = decoder.new_state(2)
    decoder.decode_step(codes[:, 100:140], state)
    state.reset()
    assert state.position.tolist() == [0, 0]
    assert (decoder.decode_step(codes[:, :20], state) - exact[:, : 20 * 1920]).abs().max().item() < TOL


def test_decoded_audio_is_finite_and_audible(exact: Tensor):
    assert torch.isfinite(exact).all()
    rms = exact.pow(2).mean(dim=-1).sqrt()  # [B]
    assert ((rms > 0.01) & (rms < 0.5)).all(), rms


def test_random_init_is_deterministic():
    a, b, c = (CodecDecoder(tiny_codec_config().decoder) for _ in range(3))
    init_random_codec_(a, seed=3)
    init_random_codec_(b, seed=3)
    init_random_codec_(c, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_chunked_reference_deviates_at_seams(
    codec: SpeechTokenizer, codes: Tensor, exact: Tensor, record_property
):
    """The official scheme re-decodes 25 frames of context per chunk, less than the receptive field
    (conv context plus 71 frames of attention per layer): its seams differ from the exact decode."""
    decoder = codec.decoder
    reference = decoder.chunked_decode_reference(codes, chunk_size=50, left_context=25)
    streamed = stream(decoder, codes, (50,))
    reference_dev = (reference - exact).abs().max().item()
    exact_dev = (streamed - exact).abs().max().item()
    record_property("chunked_reference_max_abs_dev", reference_dev)
    record_property("stateful_max_abs_dev", exact_dev)
    print(f"max abs deviation from one-shot decode: chunked {reference_dev:.3g}, stateful {exact_dev:.3g}")
    assert exact_dev < TOL < reference_dev
    # With one chunk covering everything it is the plain decode.
    assert torch.equal(decoder.chunked_decode_reference(codes[:, :40]), decoder.decode(codes[:, :40]))


@pytest.mark.parametrize("samples", [5 * 1920 - 1, 5 * 1920, 5 * 1920 + 1])
def test_encode_frames_and_range(codec: SpeechTokenizer, samples: int):
    assert codec.encoder is not None
    wav = 0.1 * torch.randn(2, samples, generator=torch.Generator().manual_seed(samples))
    out = codec.encoder.encode(wav)
    assert out.dtype == torch.long
    assert out.shape == (2, math.ceil(samples / 1920), 16)  # the official keeps ceil(S / 1920) frames
    assert out.min().item() >= 0 and out.max().item() < 2048


def test_checkpoint_round_trip(codec: SpeechTokenizer, codes: Tensor, exact: Tensor, tmp_path):
    folder = tmp_path / "model" / "speech_tokenizer"
    codec.save_pretrained(folder)
    assert json.loads((folder / "preprocessor_config.json").read_text())["sampling_rate"] == 24000
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3_tts_tokenizer_12hz"
    assert config["architectures"] == ["Qwen3TTSTokenizerV2Model"]
    assert CodecConfig.from_dict(config) == codec.config

    loaded = SpeechTokenizer.from_pretrained(tmp_path / "model")  # a model root finds speech_tokenizer/
    assert loaded.encoder is not None and codec.encoder is not None
    expected = codec.decoder.decode(codes[:, :30])
    assert torch.equal(loaded.decoder.decode(codes[:, :30]), expected)
    wav = exact[:1, : 3 * 1920]
    assert torch.equal(loaded.encode(wav), codec.encoder.encode(wav))

    decoder_only = SpeechTokenizer.from_pretrained(folder, with_encoder=False)
    assert decoder_only.encoder is None
    assert torch.equal(decoder_only.decoder.decode(codes[:, :30]), expected)
    with pytest.raises(UnsupportedOperationError):
        decoder_only.encode(wav)

    (folder / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        SpeechTokenizer.from_pretrained(folder)


def test_config_keeps_unknown_keys():
    data = tiny_codec_config().to_dict()
    data["transformers_version"] = "4.57.3"
    data["decoder_config"]["semantic_codebook_size"] = 4096
    config = CodecConfig.from_dict(data)
    assert config.to_dict() == data
    with pytest.raises(ValueError, match="decode_upsample_rate"):
        CodecConfig.from_dict({**data, "decode_upsample_rate": 960})
    with pytest.raises(ValueError, match="model_type"):
        CodecConfig.from_dict({**data, "model_type": "qwen3_tts_tokenizer_25hz"})


def test_full_config_has_the_official_layout():
    """Spot checks against the official Qwen3TTSTokenizerV2Model built from the released config."""
    with torch.device("meta"):
        model = SpeechTokenizer(full_codec_config())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 496
    assert shapes["decoder.quantizer.rvq_rest.vq.layers.14._codebook.embedding_sum"] == (2048, 256)
    assert shapes["decoder.quantizer.rvq_first.output_proj.weight"] == (512, 256, 1)
    assert shapes["decoder.pre_conv.conv.weight"] == (1024, 512, 3)
    assert shapes["decoder.pre_transformer.input_proj.weight"] == (512, 1024)
    assert shapes["decoder.pre_transformer.layers.7.self_attn.q_proj.weight"] == (1024, 512)
    assert shapes["decoder.pre_transformer.layers.7.mlp.down_proj.weight"] == (512, 1024)
    assert shapes["decoder.upsample.1.1.pwconv1.weight"] == (4096, 1024)
    assert shapes["decoder.decoder.1.block.1.conv.weight"] == (1536, 768, 16)
    assert shapes["decoder.decoder.4.block.4.conv1.conv.weight"] == (96, 96, 7)
    assert shapes["decoder.decoder.6.conv.weight"] == (1, 96, 7)
    assert shapes["encoder.encoder.layers.12.conv.weight"] == (1024, 512, 16)
    assert shapes["encoder.downsample.conv.weight"] == (512, 512, 4)
    acoustic = "encoder.quantizer.acoustic_residual_vector_quantizer"
    assert shapes[f"{acoustic}.layers.30.codebook.embed_sum"] == (2048, 256)


def test_bad_codes_are_rejected(codec: SpeechTokenizer):
    decoder = codec.decoder
    with pytest.raises(ValueError):
        decoder.decode_step(torch.zeros(1, 2, 8, dtype=torch.long), decoder.new_state(1))
    with pytest.raises(ValueError):
        decoder.decode_step(torch.zeros(2, 2, 16, dtype=torch.long), decoder.new_state(1))
    with pytest.raises(ValueError):
        decoder.decode_step(torch.zeros(1, 0, 16, dtype=torch.long), decoder.new_state(1))


def test_state_dataclass_fields_are_batched(codec: SpeechTokenizer):
    state = codec.decoder.new_state(3)
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        for tensor in value if isinstance(value, list) else [value]:
            assert tensor.shape[0] == 3
