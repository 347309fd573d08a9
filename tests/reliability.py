"""Figures measured by the reliability tests, gathered for ``docs/RELIABILITY.md``.

A test asserts its rule as usual and also calls ``record`` with what it tried and what it
measured. ``record`` writes one JSON line to the file named by ``$RELIABILITY_OUT`` (set by
``make reliability``) and does nothing otherwise, so the default run is unchanged.

    record("bad input", "wav truncated", code="INVALID_ARGUMENT", message=msg)
    record("soak", "1000 sequential streams", errors=0, rss_growth_mb=12.5)
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

_lock = threading.Lock()


def enabled() -> bool:
    return bool(os.environ.get("RELIABILITY_OUT"))


def record(section: str, item: str, **figures: Any) -> None:
    """Append ``{section, item, figures..., at}`` to ``$RELIABILITY_OUT`` (when set)."""
    path = os.environ.get("RELIABILITY_OUT")
    if not path:
        return
    row = {"section": section, "item": item, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **figures}
    line = json.dumps(row, default=str, ensure_ascii=False)
    with _lock, open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
