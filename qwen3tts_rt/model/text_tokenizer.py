"""The Qwen2 byte-level BPE text tokenizer, in pure Python.

Qwen3-TTS checkpoints ship the Qwen2 tokenizer files (``vocab.json``, ``merges.txt``,
``tokenizer_config.json``); the official package loads them with transformers
(``Qwen2TokenizerFast``) and tokenizes the prompt templates

* target text:  ``<|im_start|>assistant\\n{text}<|im_end|>\\n<|im_start|>assistant\\n``, text ids = ``ids[3:-5]``
* ref text:     ``<|im_start|>assistant\\n{ref_text}<|im_end|>\\n``, ref ids = ``ids[3:-2]``
* instruct:     ``<|im_start|>user\\n{instruct}<|im_end|>\\n``, all ids.

:class:`TextTokenizer` reproduces that pipeline (NFC normalisation, the pre-tokenizer
regex, byte-level BPE with the checkpoint's merges) without transformers, so that the
incremental tokenizer (``qwen3tts_rt.engine.incremental_tokenizer``) can run the very same
steps piece by piece. The tests check it id for id against transformers 4.57 and 5.x and
against tiktoken.

The files of made-up checkpoints are written by
``qwen3tts_rt.model.fabricate.write_tokenizer_files``.
"""

from __future__ import annotations

import functools
import heapq
import json
import os
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import regex
from packaging.version import Version

from qwen3tts_rt.errors import CheckpointError, InvalidInputError

# --------------------------------------------------------------------------- constants

#: The pre-tokenizer of Qwen2/Qwen2.5/Qwen3 (``Qwen2Tokenizer`` in transformers, tiktoken's Qwen pattern).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: The pattern transformers 4.57.2+ swaps in when a tokenizer is loaded with
#: ``fix_mistral_regex=True`` and ``_patch_mistral_regex`` decides to patch (see
#: :func:`official_pretokenizer`); the official qwen-tts package passes that flag.
MISTRAL_FIX_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PreTokenizer = Literal["qwen2", "mistral_fix"]
PATTERNS: dict[str, str] = {"qwen2": QWEN2_PATTERN, "mistral_fix": MISTRAL_FIX_PATTERN}

#: First id after the 151,643 BPE ranks; the model's text vocabulary ends at 151,935.
SPECIAL_START_ID = 151643
TEXT_VOCAB_SIZE = 151936
#: Qwen's added tokens from id 151643 on (Qwen3 / Qwen2.5-Omni / Qwen3-TTS order):
#: 151671..151673 are tts_pad / tts_bos / tts_eos of the Qwen3-TTS config.
KNOWN_ADDED_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
)
#: Added tokens that Qwen3's tokenizer_config.json marks ``"special": false``.
NON_SPECIAL_ADDED = frozenset(KNOWN_ADDED_TOKENS[14:26])
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE files."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _to_unicode(data: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


# --------------------------------------------------------------------------- NFC, streamable


def _is_starter(ch: str) -> bool:
    """True when ``ch`` (and the first character of its decomposition) has combining class 0:
    canonical reordering never moves anything across such a character."""
    if ch < "\u0300":  # Latin-1 and Latin Extended: all starters (checked in the tests)
        return True
    return unicodedata.combining(ch) == 0 and unicodedata.combining(unicodedata.normalize("NFD", ch)[0]) == 0


class NfcStream:
    """NFC normalisation of a text that arrives in pieces.

    The raw text is cut into *segments*, each a starter followed by its non-starters,
    merged with the previous segment when the starter composes with it (Hangul jamo,
    some Indic vowel signs). A segment is closed when the next starter arrives and does
    not compose with it; from then on NFC(closed segments) + NFC(rest) == NFC(everything),
    whatever text follows, because canonical reordering stops at starters and a character
    composes only with the last starter before it. Only the open segment (usually the last
    character) can still change.
    """

    def __init__(self) -> None:
        self._open = ""

    @property
    def open_segment(self) -> str:
        """Raw text of the segment that later characters may still change."""
        return self._open

    def push(self, text: str) -> list[tuple[str, str]]:
        """Feed raw text; returns the segments closed by it as (raw, normalized) pairs."""
        closed: list[tuple[str, str]] = []
        seg = self._open
        for ch in text:
            if seg and _is_starter(ch):
                if ch < "\u0300":  # no composition has a second element below U+0300
                    closed.append((seg, unicodedata.normalize("NFC", seg)))
                    seg = ch
                    continue
                a = unicodedata.normalize("NFC", seg)
                if unicodedata.normalize("NFC", seg + ch) == a + unicodedata.normalize("NFC", ch):
                    closed.append((seg, a))
                    seg = ch
                    continue
            seg += ch
        self._open = seg
        return closed

    def end(self) -> list[tuple[str, str]]:
        """Close the open segment (the text has ended)."""
        if not self._open:
            return []
        seg, self._open = self._open, ""
        return [(seg, unicodedata.normalize("NFC", seg))]


def segment_char_ends(raw: str, norm: str, raw_start: int) -> list[int]:
    """For each character of ``norm`` = NFC(``raw``), the offset in the raw text just past the
    raw characters it stands for. Exact where NFC left the segment alone, else the segment end."""
    if raw == norm:
        return list(range(raw_start + 1, raw_start + len(raw) + 1))
    return [raw_start + len(raw)] * len(norm)


def nfc_with_offsets(text: str) -> tuple[str, list[int]]:
    """NFC(text) and, per normalized character, the raw offset just past what it covers."""
    if unicodedata.is_normalized("NFC", text):
        return text, list(range(1, len(text) + 1))
    stream = NfcStream()
    parts: list[str] = []
    ends: list[int] = []
    pos = 0
    for raw, norm in stream.push(text) + stream.end():
        parts.append(norm)
        ends.extend(segment_char_ends(raw, norm, pos))
        pos += len(raw)
    return "".join(parts), ends


# --------------------------------------------------------------------------- the tokenizer


@dataclass(frozen=True)
class TokenSpan:
    """One BPE token of a pre-tokenizer piece: its id and how many characters of the piece
    its bytes (together with those of the tokens before it) fully cover."""

    id: int
    char_end: int


def _check_encodable(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(f"text holds a lone surrogate at index {e.start}", field="text") from None


class TextTokenizer:
    """Qwen2 byte-level BPE, as transformers' ``Qwen2Tokenizer(Fast)`` runs it.

    Pipeline of :meth:`encode`: NFC normalisation, the pre-tokenizer regex
    (:data:`QWEN2_PATTERN`, or :data:`MISTRAL_FIX_PATTERN` — see :func:`official_pretokenizer`),
    then BPE on the UTF-8 bytes of each piece with the checkpoint's merges.

    **User text is plain text.** Strings such as ``"<|im_end|>"`` inside a text are
    tokenized as the characters they are made of. The official package builds one prompt
    string and lets transformers split added tokens out of it, so there a literal
    ``"<|im_end|>"`` (or any other added token, special or not) in the user's text would
    become a control token and end the text early; we never let user text inject control
    tokens. For text free of added-token strings the ids are identical.

    **Leading newlines.** The official slice ``ids[3:-5]`` assumes the template's
    ``"assistant"`` and ``"\\n"`` are two tokens. A text that starts with whitespace
    holding ``\\r``/``\\n`` merges with that ``"\\n"`` into one pre-tokenizer piece, and the
    slice then drops that piece's first token together with the template's newline.
    :meth:`text_ids` reproduces this exactly (it tokenizes ``"\\n" + text`` and drops the
    first id), so it equals the official ``ids[3:-5]`` for every plain text: in effect
    leading line breaks are swallowed, as in the official package (a leading whitespace run
    too long for one token loses only its first token). We keep this rather than strip, so
    that a stream is bit-exact with the official whole-text call.

    **Pre-tokenizer.** ``"qwen2"`` is what transformers' Qwen2 tokenizer uses (and what
    the official package gets when it loads a checkpoint by hub id, or under transformers 5).
    The official package under its pinned transformers 4.57.3, loading a *local* directory,
    silently gets ``"mistral_fix"`` instead; :func:`official_pretokenizer` tells which.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Iterable[tuple[str, str]],
        added_tokens: Mapping[int, str],
        *,
        pretokenizer: PreTokenizer = "qwen2",
        cache_size: int = 65536,
    ) -> None:
        if pretokenizer not in PATTERNS:
            raise ValueError(f"pretokenizer must be one of {sorted(PATTERNS)}, got {pretokenizer!r}")
        self.pretokenizer: PreTokenizer = pretokenizer
        self._pattern = regex.compile(PATTERNS[pretokenizer])
        self._encoder: dict[str, int] = dict(vocab)
        dec = _unicode_to_bytes()
        self._decoder: dict[int, bytes] = {i: bytes(dec[c] for c in tok) for tok, i in self._encoder.items()}
        self._merge_ranks: dict[str, int] = {f"{a} {b}": i for i, (a, b) in enumerate(merges)}
        self._added: dict[int, str] = dict(added_tokens)
        self._added_ids: dict[str, int] = {name: i for i, name in self._added.items()}
        self._cache: dict[str, tuple[TokenSpan, ...]] = {}
        self._cache_size = cache_size
        self.im_start_id = self.token_to_id(IM_START)
        self.im_end_id = self.token_to_id(IM_END)
        self._newline_ids = self.encode("\n")
        self._role_prefix = [self.im_start_id, *self.encode("assistant\n")]

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dir(
        cls, checkpoint_dir: str | os.PathLike[str], *, pretokenizer: PreTokenizer = "qwen2"
    ) -> TextTokenizer:
        """Load from a checkpoint directory (local files only): ``vocab.json`` + ``merges.txt``
        (or ``tokenizer.json``) and the added tokens of ``tokenizer_config.json``."""
        d = Path(checkpoint_dir)
        vocab: dict[str, int]
        merges: list[tuple[str, str]]
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
            merges = _parse_merges((d / "merges.txt").read_text(encoding="utf-8").splitlines())
        elif (d / "tokenizer.json").is_file():
            model = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            vocab = model["vocab"]
            merges = []
            for m in model["merges"]:  # ["a", "b"] (tokenizers >= 0.20) or "a b"
                a, b = m if isinstance(m, list) else m.split(" ")
                merges.append((a, b))
        else:
            raise CheckpointError(
                f"{d}: no text tokenizer files (vocab.json + merges.txt, or tokenizer.json)"
            )
        added: dict[int, str] = {}
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            for k, v in cfg.get("added_tokens_decoder", {}).items():
                added[int(k)] = v["content"]
        if (d / "tokenizer.json").is_file():
            for t in json.loads((d / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", []):
                added.setdefault(int(t["id"]), t["content"])
        for name in (IM_START, IM_END):
            if name not in added.values():
                raise CheckpointError(f"{d}: tokenizer_config.json lacks the added token {name}")
        return cls(vocab, merges, added, pretokenizer=pretokenizer)

    # ------------------------------------------------------------------ vocabulary

    def __len__(self) -> int:
        return max(max(self._decoder), max(self._added)) + 1

    def token_to_id(self, token: str) -> int:
        """Id of an added token (``"<|im_start|>"``) or of a vocabulary entry (byte-level form)."""
        if token in self._added_ids:
            return self._added_ids[token]
        if token in self._encoder:
            return self._encoder[token]
        raise KeyError(token)

    def id_to_token(self, token_id: int) -> str:
        if token_id in self._added:
            return self._added[token_id]
        return _to_unicode(self._decoder[token_id])

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes a BPE token stands for (the name, encoded, for an added token)."""
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        return self._decoder[token_id]

    @property
    def added_tokens(self) -> dict[int, str]:
        return dict(self._added)

    @property
    def bpe_vocab(self) -> Mapping[str, int]:
        """Byte-level BPE symbol (the ``vocab.json`` form) -> id; added tokens not included.
        The tokenizer's own table: read it, do not change it."""
        return self._encoder

    @property
    def merge_ranks(self) -> Mapping[str, int]:
        """``"a b"`` (the two symbols of a merge, space-separated; byte-level symbols hold no
        space) -> its rank, lower merges first. The tokenizer's own table: read it only."""
        return self._merge_ranks

    # ------------------------------------------------------------------ core pipeline

    def normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", text)

    def pretokenize(self, normalized: str) -> list[tuple[int, int]]:
        """Pre-tokenizer pieces of already normalized text, as (start, end) character spans."""
        return [m.span() for m in self._pattern.finditer(normalized)]

    def encode_piece(self, piece: str) -> tuple[TokenSpan, ...]:
        """BPE of one pre-tokenizer piece (cached)."""
        hit = self._cache.get(piece)
        if hit is not None:
            return hit
        data = piece.encode("utf-8")
        table = bytes_to_unicode()
        words = _bpe_merge([table[b] for b in data], self._merge_ranks)
        # map byte ends to character ends
        char_byte_ends: list[int] = []
        n = 0
        for ch in piece:
            n += len(ch.encode("utf-8"))
            char_byte_ends.append(n)
        out: list[TokenSpan] = []
        byte_end = 0
        chars = 0
        for w in words:
            byte_end += len(w)
            while chars < len(char_byte_ends) and char_byte_ends[chars] <= byte_end:
                chars += 1
            out.append(TokenSpan(self._encoder[w], chars))
        result = tuple(out)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[piece] = result
        return result

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` as plain text (no added tokens recognised), no template."""
        _check_encodable(text)
        norm = self.normalize(text)
        return [t.id for s, e in self.pretokenize(norm) for t in self.encode_piece(norm[s:e])]

    # ------------------------------------------------------------------ the official slices

    def text_ids_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """:meth:`text_ids` and, for each id, how many characters of ``text`` the ids up to and
        including it cover (non-decreasing; a character split over several byte tokens counts
        once its last byte is out; where NFC changed the text, per normalisation segment)."""
        _check_encodable(text)
        norm, ends = nfc_with_offsets(text)
        full = "\n" + norm
        full_ends = [0, *ends]
        ids: list[int] = []
        offsets: list[int] = []
        last = 0
        for s, e in self.pretokenize(full):
            for t in self.encode_piece(full[s:e]):
                if t.char_end > 0:
                    last = max(last, full_ends[s + t.char_end - 1])
                ids.append(t.id)
                offsets.append(last)
        return ids[1:], offsets[1:]

    def text_ids(self, text: str) -> list[int]:
        """The text tokens exactly as the official ``ids[3:-5]`` of the assistant template
        (``encode("\\n" + text)`` without its first id; see the class docstring). These are
        the ids the dual-track schedule feeds one per frame."""
        return self.text_ids_with_offsets(text)[0]

    def char_offsets(self, text: str) -> list[int]:
        """For streaming progress: ``char_offsets(text)[k - 1]`` characters of ``text`` are
        covered by the first ``k`` ids of :meth:`text_ids`."""
        return self.text_ids_with_offsets(text)[1]

    def ref_text_ids(self, ref_text: str) -> list[int]:
        """Reference transcript ids, as the official ``ids[3:-2]`` of
        ``<|im_start|>assistant\\n{ref_text}<|im_end|>\\n`` (same rule as :meth:`text_ids`)."""
        return self.text_ids(ref_text)

    def instruct_ids(self, instruct: str) -> list[int]:
        """All ids of ``<|im_start|>user\\n{instruct}<|im_end|>\\n`` (the official uses them whole)."""
        return [self.im_start_id, *self.encode("user\n" + instruct), self.im_end_id, *self._newline_ids]

    def role_prefix_ids(self) -> list[int]:
        """``<|im_start|>assistant\\n``: 3 ids."""
        return list(self._role_prefix)

    def assistant_ids(self, text: str) -> list[int]:
        """All ids of the target-text template, as the official tokenizes it (for plain text)."""
        return [
            self.im_start_id,
            *self.encode("assistant\n" + text),
            self.im_end_id,
            *self._newline_ids,
            *self._role_prefix,
        ]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 (a character cut between tokens) becomes U+FFFD."""
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            if i in self._added:
                if buf:
                    out.append(buf.decode("utf-8", errors="replace"))
                    buf.clear()
                if not skip_special_tokens:
                    out.append(self._added[i])
            else:
                buf.extend(self._decoder[i])
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


def _bpe_merge(symbols: list[str], ranks: Mapping[str, int]) -> list[str]:
    """Byte-level BPE as tokenizers' ``Word::merge_all`` runs it: repeatedly merge the adjacent
    pair with the lowest merge rank (leftmost first), in O(n log n) with a heap."""
    n = len(symbols)
    if n < 2:
        return symbols
    syms = list(symbols)
    nxt = [*range(1, n), -1]
    prv = list(range(-1, n - 1))
    alive = [True] * n
    heap: list[tuple[int, int]] = []
    for i in range(n - 1):
        r = ranks.get(f"{syms[i]} {syms[i + 1]}")
        if r is not None:
            heap.append((r, i))
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        if not alive[i]:
            continue
        j = nxt[i]
        if j < 0 or ranks.get(f"{syms[i]} {syms[j]}") != rank:
            continue  # stale entry: one side was merged into something else
        syms[i] += syms[j]
        alive[j] = False
        k = nxt[j]
        nxt[i] = k
        if k >= 0:
            prv[k] = i
            r = ranks.get(f"{syms[i]} {syms[k]}")
            if r is not None:
                heapq.heappush(heap, (r, i))
        h = prv[i]
        if h >= 0:
            r = ranks.get(f"{syms[h]} {syms[i]}")
            if r is not None:
                heapq.heappush(heap, (r, h))
    return [syms[i] for i in range(n) if alive[i]]


def _parse_merges(lines: Iterable[str]) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    for i, line in enumerate(lines):
        if i == 0 and line.startswith("#version"):
            continue
        if not line:
            continue
        a, b = line.split(" ")
        merges.append((a, b))
    return merges


def official_pretokenizer(checkpoint_dir: str | os.PathLike[str]) -> PreTokenizer:
    """The pre-tokenizer the official package (``AutoProcessor.from_pretrained(dir,
    fix_mistral_regex=True)`` under its pinned transformers 4.57.3) ends up with when it loads
    a *local* checkpoint directory: transformers replaces the Qwen2 regex by
    :data:`MISTRAL_FIX_PATTERN` unless ``config.json`` is absent, or names
    ``transformers_version`` >= 5.0.0, or names one <= 4.57.2 together with a non-Mistral
    ``model_type``. (Loading by hub id does not patch; transformers >= 5 does not patch.)
    """
    cfg_path = Path(checkpoint_dir) / "config.json"
    if not cfg_path.is_file():
        return "qwen2"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    version = cfg.get("transformers_version")
    model_type = cfg.get("model_type")
    if version:
        v = Version(version)
        if v <= Version("4.57.2"):
            if model_type is not None and model_type not in _MISTRAL_TYPES:
                return "qwen2"
        elif v >= Version("5.0.0"):
            return "qwen2"
    return "mistral_fix"


_MISTRAL_TYPES = ("mistral", "mistral3", "voxtral", "ministral", "pixtral")
