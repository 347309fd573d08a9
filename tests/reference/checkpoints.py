"""The tiny random-weight checkpoints the reference data was made on.

Used both by ``run_reference.sh`` (to make them for the official package) and by the
tests (to rebuild the identical checkpoints); ``model.safetensors`` hashes recorded in
the manifest prove they are the same weights.

``tiny-custom-1b7`` is a tiny CustomVoice checkpoint whose config.json says
``tts_model_size: 1b7``: the official package decides from that string alone whether a
CustomVoice model follows ``instruct`` (0.6B ones ignore it), so it stands in for the
1.7B CustomVoice checkpoint with instructions.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from qwen3tts_rt.model.fabricate import make_checkpoint

# name: (preset, kind, seed, tts_model_size written over the preset's, or None)
CHECKPOINTS: dict[str, tuple[str, str, int, str | None]] = {
    "tiny-base": ("tiny", "base", 11, None),
    "tiny-custom": ("tiny", "custom_voice", 12, None),
    "tiny-design": ("tiny", "voice_design", 13, None),
    "tiny-custom-1b7": ("tiny", "custom_voice", 14, "1b7"),
}


def weights_hash(ckpt_dir: Path) -> str:
    h = hashlib.sha256()
    for f in ("model.safetensors", "speech_tokenizer/model.safetensors"):
        h.update((ckpt_dir / f).read_bytes())
    return h.hexdigest()


def build(root: Path) -> dict[str, Path]:
    out = {}
    for name, (preset, kind, seed, size) in CHECKPOINTS.items():
        d = root / name
        if not (d / "model.safetensors").is_file():
            make_checkpoint(d, preset=preset, kind=kind, seed=seed)
            if size is not None:
                cfg_path = d / "config.json"
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
                cfg["tts_model_size"] = size
                cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        out[name] = d
    return out


if __name__ == "__main__":
    for name, d in build(Path(sys.argv[1])).items():
        print(name, d, weights_hash(d))
