"""The tiny random-weight checkpoints the reference data was made on.

Used both by ``run_reference.sh`` (to make them for the official package) and by the
tests (to rebuild the identical checkpoints); ``model.safetensors`` hashes recorded in
the manifest prove they are the same weights.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from qwen3tts_rt.model.checkpoint import make_checkpoint

CHECKPOINTS = {
    "tiny-base": ("tiny", "base", 11),
    "tiny-custom": ("tiny", "custom_voice", 12),
    "tiny-design": ("tiny", "voice_design", 13),
}


def weights_hash(ckpt_dir: Path) -> str:
    h = hashlib.sha256()
    for f in ("model.safetensors", "speech_tokenizer/model.safetensors"):
        h.update((ckpt_dir / f).read_bytes())
    return h.hexdigest()


def build(root: Path) -> dict[str, Path]:
    out = {}
    for name, (preset, kind, seed) in CHECKPOINTS.items():
        d = root / name
        if not (d / "model.safetensors").is_file():
            make_checkpoint(d, preset=preset, kind=kind, seed=seed)
        out[name] = d
    return out


if __name__ == "__main__":
    for name, d in build(Path(sys.argv[1])).items():
        print(name, d, weights_hash(d))
