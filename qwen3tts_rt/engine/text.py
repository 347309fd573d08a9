"""The text rules every entry point shares (gRPC, Riva, the CLI, the Python API).

* Control characters (C0/C1 other than tab, line feed, carriage return) are invisible,
  never speech, and would reach the model as byte tokens: each becomes one space, so
  character offsets (``chars_consumed``) still count the client's characters.
* An utterance *has something to say* when its text holds at least one character that
  is not whitespace, not a control character and not an invisible format character
  (zero-width space/joiners, word joiner, BOM, bidi marks ...). Whitespace-only and
  zero-width-only text are treated alike: no audio.
"""

from __future__ import annotations

import unicodedata

_CONTROL = {c: " " for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0))}
_SILENT_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def clean_text(text: str) -> str:
    """Text as the model gets it: control characters become spaces (same length)."""
    return text.translate(_CONTROL)


def is_silent(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch) in _SILENT_CATEGORIES


def has_speech(text: str) -> bool:
    """Whether ``text`` holds anything to say."""
    return any(not is_silent(c) for c in text)
