"""Stable incremental text tokenization: text deltas in, text ids out as soon as they are final.

The talker consumes one text token per 80 ms frame, so a session can start speaking as
soon as its first text token is known for certain. :class:`IncrementalTokenizer` runs the
steps of :class:`~qwen3tts_rt.model.text_tokenizer.TextTokenizer` (NFC, the pre-tokenizer
regex, BPE per piece) on the *pending tail* of the text only and emits every id that no
later text can change. For every way of cutting a text into deltas, the concatenated ids
equal ``tokenizer.text_ids(full_text)`` (property-tested, with a brute-force oracle).

**Between pieces** (lag rule, unchanged from the piece-level tokenizer): every
pre-tokenizer piece of the text received so far is complete except

1. the last piece (more letters, digits, marks or an apostrophe suffix may extend it);
2. every piece that overlaps the trailing whitespace run (``"a  "`` + ``"b"`` re-splits
   the spaces as ``" "``, ``" b"``; ``"\\n "`` + ``"\\n"`` merges into ``"\\n \\n"``);
3. anything from the last NFC segment on (the last starter character and the combining
   marks after it, which a later combining mark could still compose or reorder).

Why pieces before these are final: the regex has no look-behind, a match depends only on
the characters from its start to one past its end (a whitespace run is looked at as a
whole: rule 2), and NFC composition never changes the regex class (letter case, mark,
digit, space) of the character it composes into (checked over the whole Unicode table).

**Inside the last piece** (``eager=True``, the default), when it is a run of letters, the
ids of its prefix are emitted as soon as they are proven final. Two things must be proven.

*A. The piece cannot move.* Let ``K`` be the *known* text of the last piece: its closed
NFC segments, plus the first character ``c`` of the open segment when no later input can
change ``c`` (a starter that is its own NFD and is the first half of no canonical
composition, Hangul ``L`` jamo included: then NFC(open + anything) starts with ``c``; CJK
ideographs qualify, kana that take a voicing mark do not). This is tried only when every
piece before the last one is out (so the last one starts in the closed text, where the
previous, complete, piece ends: its start is fixed). ``K`` qualifies when it matches, whole,

* Qwen2 pattern: ``[^\\r\\n\\p{L}\\p{N}]?\\p{L}+``. The contractions (``'s 't 're 've
  'm 'll 'd``) are tried first at the piece start. If one matches the future text there and
  ends within ``K``, it matched the current text too, so it is the current piece, which
  holds ``K``: the piece is ``K``. If it ends beyond ``K``, it is ``K`` + more. If none
  matches, the letter alternative does, and its greedy ``\\p{L}+`` covers every letter of
  ``K`` whatever follows;
* Mistral-fix pattern: ``[^\\r\\n\\p{L}\\p{N}]?[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+``. Its first
  alternative, ``P?[ULoM]*[LlLoM]+`` (``U`` = ``Lu Lt``), is tried first. ``P?`` takes the
  optional first character of ``K`` as now (if the rest then fails, it gives it back and
  the same argument runs from that character, which is then in ``[LlLoM]``). The greedy
  ``[ULoM]*`` backs off one character at a time and the first length ``j`` where
  ``[LlLoM]+`` can start wins. Every other character of ``K`` is in ``[LlLoM]``, so a start
  ``j < len(K)`` always succeeds and runs to the end of ``K`` at least, and a start
  ``j >= len(K)`` ends beyond ``K``.

So whatever follows, the piece is ``K + S`` for some byte string ``S`` (possibly empty).

*B. The BPE boundary cannot move.* BPE repeatedly merges the adjacent pair of lowest rank,
the leftmost one among equals (``TextTokenizer``, Hugging Face tokenizers and tiktoken all
do). Take bytes ``Q = L + R`` (``R`` the known bytes after a candidate
boundary ``b``) and run BPE on ``L`` alone: states ``s_0 .. s_m``, where ``e_j`` is the
last symbol of ``s_j`` and ``mu_j`` the rank of the merge applied to ``s_j`` (the lowest
pair rank in ``s_j``; infinite when ``s_j`` is final). The criterion:

    ``b`` is final if, for every ``j`` and every vocabulary symbol ``y`` that is a prefix
    of ``R`` or has ``R`` as a prefix, the merge ``(e_j, y)`` is absent or does not rank
    below ``mu_j``.

Proof. *Lemma:* if no merge of a BPE run on ``X`` crosses ``b``, its merges left of ``b``,
in order, are exactly the run on ``X[:b]`` alone (each was the lowest pair of the whole
sequence, hence of the left part, and ties go left in both), likewise on the right, so
``BPE(X) = BPE(X[:b]) + BPE(X[b:])``. Now run BPE on ``L + R + S`` for any ``S`` and
suppose some merge crosses ``b``; take the first one, ``(x, y)``. Before it, by the lemma's
argument, the left part went through a prefix of the run on ``L``: it is in some state
``s_j`` and ``x = e_j``. ``y`` is the first symbol right of ``b``: its bytes are a prefix of
``R + S``, so it is a prefix of ``R`` or ``R`` is a prefix of it. The merge was chosen
while ``s_j``'s lowest pair, which lies left of it, ranked ``mu_j``: so ``rank(x, y) < mu_j``
(or ``s_j`` was final and the merge exists at all), against the criterion. Hence no merge crosses ``b``,
and the lemma gives ``BPE(L + R + S) = BPE(L) + BPE(R + S)``: the ids of ``L`` are final
and the remaining bytes can be tokenized on their own, so the argument repeats inside the
rest of the piece. Nothing here uses how the ranks were made: it holds for any merge table
(including ones where a merge ranks below the merges that make its parts: runs need not
apply ranks in increasing order), as long as pieces are BPE-ed on their own. For each distinct ``e_j`` the code checks once,
against the largest ``mu_j`` of the states that share it (the criterion, for all of
them). It is conservative where it over-approximates: the symbols that can really reach
``b`` from the right are fewer than those ``y``.

``Q`` is the first ``eager_window`` (64) bytes of the last piece from its first unemitted
byte, the known ones (bytes beyond count as unknown, part of ``S``: sound, and it bounds the
work). The candidate boundaries are the token ends of ``BPE(Q)`` (setting ``S`` empty shows
a final boundary is one), tried right to left, and the ids up to the first final one are
emitted; no token that covers the open NFC segment's character is emitted (its offset in
:attr:`IncrementalTokenizer.char_ends` depends on marks that may follow). So a CJK token
usually goes out once the character after it has arrived. Runs the criterion cannot settle
wait for their end, as whole pieces do: in ``"哈哈哈哈…"`` the first token is ``哈哈`` in a
run of 5 and ``哈哈哈哈`` in longer ones, but proving it would take knowing when the ``哈``
right of the boundary is merged away, which the criterion does not track.

Deltas are ``str``, so a code point is never split; a grapheme (``"e"`` + ``"\\u0301"``,
an emoji ZWJ sequence, a flag) can be, and NFC handles that.

Cost of a ``push``: linear in the delta plus the pending (not yet emitted) tail (the regex),
plus, inside the last piece, BPE of at most ``eager_window`` bytes and one pass over its
merges per candidate boundary, with dictionary look-ups; a window that did not change since
it proved nothing is not tried again. The merges grouped by left symbol are built once per
:class:`TextTokenizer`, on first use (~0.1 s for Qwen's); per left symbol, a prefix table of
its partners is built on demand and kept (at most :data:`PARTNER_TABLES_KEPT` of them).
"""

from __future__ import annotations

import bisect
import functools
import heapq
import threading
import unicodedata
import weakref
from collections.abc import Mapping, Sequence

import regex

from qwen3tts_rt.errors import InvalidInputError
from qwen3tts_rt.model.text_tokenizer import NfcStream, TextTokenizer, bytes_to_unicode, segment_char_ends

#: Default of ``eager_window``: bytes of the last piece, from its first unemitted one, that the
#: boundary proof looks at (bytes beyond count as unknown, which is sound; it bounds the work).
EAGER_WINDOW_BYTES = 64
#: Per merge table, how many left symbols' partner tables are kept before the cache is reset.
PARTNER_TABLES_KEPT = 8192

_NEVER = 1 << 62  # a rank above every real rank: "the state is final"

# Shape of the known part of a last piece that can only grow (see the module docstring, A).
_GROWING_PIECE = {
    "qwen2": regex.compile(r"[^\r\n\p{L}\p{N}]?\p{L}+"),
    "mistral_fix": regex.compile(r"[^\r\n\p{L}\p{N}]?[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"),
}

#: Canonical decompositions exist only below this code point (checked in the tests).
_DECOMPOSITION_LIMIT = 0x30000


@functools.cache
def composition_firsts() -> frozenset[str]:
    """Characters that are the first half of a canonical (primary) composition, Hangul ``L``
    jamo included: exactly the starters that a later character can change under NFC."""
    firsts = {chr(cp) for cp in range(0x1100, 0x1113)}  # L + V -> LV (algorithmic)
    for cp in range(_DECOMPOSITION_LIMIT):
        d = unicodedata.decomposition(chr(cp))
        if not d or d[0] == "<":
            continue
        parts = d.split()
        if len(parts) != 2:
            continue
        first, second = (chr(int(p, 16)) for p in parts)
        if unicodedata.normalize("NFC", first + second) == chr(cp):
            firsts.add(first)
    return frozenset(firsts)


@functools.lru_cache(maxsize=4096)
def nfc_prefix_stable(ch: str) -> bool:
    """True when NFC(``ch`` + anything) starts with ``ch``: a starter, its own NFD, and the
    first half of no composition (nothing after it can compose with it or move before it)."""
    if unicodedata.combining(ch) != 0 or unicodedata.normalize("NFD", ch) != ch:
        return False
    return ch not in composition_firsts()


def bpe_run(
    symbols: Sequence[str], ranks: Mapping[str, int], log: list[tuple[int, int, int]] | None = None
) -> list[str]:
    """Byte-level BPE of single-byte ``symbols`` (the same run as ``TextTokenizer.encode_piece``:
    lowest merge rank first, leftmost first). When ``log`` is given, each merge is appended
    to it in order as ``(rank, start, end)``: the byte span of the symbol it made."""
    n = len(symbols)
    if n < 2:
        return list(symbols)
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
            continue  # stale entry
        if log is not None:
            log.append((rank, i, j + len(syms[j])))  # symbol i starts at byte i
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


class _Partners:
    """The merges ``(x, y)`` of one left symbol ``x``: ``exact[y]`` = rank, and ``lowest[p]`` =
    the lowest rank over the partners ``y`` that start with ``p`` (``p = ""`` included)."""

    __slots__ = ("exact", "longest", "lowest")

    def __init__(self, partners: Sequence[tuple[str, int]]) -> None:
        self.exact: dict[str, int] = {}
        self.lowest: dict[str, int] = {}
        self.longest = 0
        for y, rank in partners:
            self.exact[y] = rank
            self.longest = max(self.longest, len(y))
            for k in range(len(y) + 1):
                p = y[:k]
                if self.lowest.get(p, _NEVER) > rank:
                    self.lowest[p] = rank

    def lowest_rank(self, right: str) -> int:
        """Lowest rank of a merge ``(x, y)`` with ``y`` a prefix of ``right`` or ``right`` a
        prefix of ``y``; :data:`_NEVER` when there is none."""
        best = self.lowest.get(right, _NEVER)
        exact = self.exact
        for k in range(1, min(len(right), self.longest) + 1):
            r = exact.get(right[:k])
            if r is not None and r < best:
                best = r
        return best


class MergeIndex:
    """Merges of one table grouped by their left symbol (built once per tokenizer)."""

    def __init__(self, ranks: Mapping[str, int], *, tables_kept: int = PARTNER_TABLES_KEPT) -> None:
        if tables_kept < 1:
            raise ValueError(f"tables_kept must be >= 1, got {tables_kept}")
        self.ranks = ranks
        self._by_left: dict[str, list[tuple[str, int]]] = {}
        for pair, rank in ranks.items():
            a, b = pair.split(" ")
            self._by_left.setdefault(a, []).append((b, rank))
        self._tables: dict[str, _Partners] = {}
        self._tables_kept = tables_kept

    def lowest_rank(self, left: str, right: str) -> int:
        """Lowest rank of a merge ``(left, y)``, ``y`` consistent with the known bytes ``right``."""
        table = self._tables.get(left)
        if table is None:
            table = _Partners(self._by_left.get(left, ()))
            if len(self._tables) >= self._tables_kept:
                self._tables.clear()
            self._tables[left] = table
        return table.lowest_rank(right)


_indexes: weakref.WeakKeyDictionary[TextTokenizer, MergeIndex] = weakref.WeakKeyDictionary()
_indexes_lock = threading.Lock()


def merge_index(tok: TextTokenizer) -> MergeIndex:
    """The shared :class:`MergeIndex` of ``tok``'s merge table."""
    with _indexes_lock:
        index = _indexes.get(tok)
        if index is None:
            index = _indexes[tok] = MergeIndex(tok.merge_ranks)
        return index


def boundary_is_final(
    index: MergeIndex, q: str, b: int, log: Sequence[tuple[int, int, int]], last: str
) -> bool:
    """The criterion of the module docstring for boundary ``b`` (``0 < b <= len(q)``) of
    ``BPE(q)``, ``q`` in byte-level symbols (one per byte), ``log`` the merges of its run,
    ``last`` the token of ``BPE(q)`` that ends at ``b``."""
    right = q[b:]
    if index.lowest_rank(last, right) != _NEVER:  # the final state (the usual failure): no merge at all
        return False
    x = q[b - 1]  # e_0: the last byte of L
    mu = -1  # the largest rank of a merge applied while x is the last symbol of L
    for rank, start, end in log:
        if end > b:
            continue  # a merge of the right part (none crosses b: b is a token end)
        if rank > mu:
            mu = rank
        if end == b:  # x is replaced: check it against every state it was last in (ties go left)
            if index.lowest_rank(x, right) < mu:
                return False
            x = q[start:end]
            mu = -1
    return True


class IncrementalTokenizer:
    """Per-session incremental tokenizer over a shared :class:`TextTokenizer` (which holds
    no per-text state).

    ``official_slice=True`` (default) yields :meth:`TextTokenizer.text_ids` (the official
    ``ids[3:-5]`` of the assistant template: the text is tokenized after the template's
    ``"\\n"`` and the first id dropped); ``False`` yields :meth:`TextTokenizer.encode`.
    ``eager=False`` keeps the last piece whole until it is complete (the piece-level
    tokenizer, for comparisons); ``eager_window`` bounds the bytes of the last piece that
    the proof looks at per push.

    Cost of a ``push``: linear in the delta plus the pending (not yet emitted) tail, plus a
    bounded proof inside the last piece (see the module docstring).
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        *,
        official_slice: bool = True,
        eager: bool = True,
        eager_window: int = EAGER_WINDOW_BYTES,
    ) -> None:
        if eager_window < 1:
            raise ValueError(f"eager_window must be >= 1 (bytes), got {eager_window}")
        self._tok = tokenizer
        self._eager = eager
        self._window = eager_window
        self._index = merge_index(tokenizer) if eager else None
        self._nfc = NfcStream()
        # Normalized text of closed NFC segments not emitted yet (from a piece start), and for
        # each of its characters the raw offset (in the full input text) just past what it covers.
        self._norm = "\n" if official_slice else ""
        self._norm_ends: list[int] = [0] if official_slice else []
        # Bytes (and whole characters) of the first piece of _norm already emitted.
        self._head_bytes = 0
        self._head_chars = 0
        # (window bytes, emit limit) of that piece last tried in vain: same input, same verdict
        self._stuck: tuple[int, int] | None = None
        self._skip_first = official_slice
        self._closed_raw = 0  # raw characters that are in closed segments
        self._pushed = 0
        self._ids: list[int] = []
        self._char_ends: list[int] = []
        self._consumed = 0
        self._ended = False

    # ------------------------------------------------------------------ state

    @property
    def ids(self) -> Sequence[int]:
        """All ids emitted so far (a read-only view, not a copy)."""
        return self._ids

    @property
    def char_ends(self) -> Sequence[int]:
        """For each emitted id, how many characters of the input text the ids up to and
        including it cover (non-decreasing; the numbers of :meth:`TextTokenizer.char_offsets`).
        A read-only view, not a copy."""
        return self._char_ends

    @property
    def consumed_chars(self) -> int:
        """Characters of the input text covered by the ids emitted so far."""
        return self._consumed

    @property
    def pushed_chars(self) -> int:
        """Characters pushed so far."""
        return self._pushed

    @property
    def pending_chars(self) -> int:
        """Normalized characters received but not covered by emitted ids yet (the work a
        ``push`` redoes is proportional to this plus the delta)."""
        return len(self._norm) - self._head_chars + len(self._nfc.open_segment)

    @property
    def ended(self) -> bool:
        return self._ended

    # ------------------------------------------------------------------ input

    def push(self, delta: str) -> list[int]:
        """Add a text delta; returns the ids that became final (possibly none)."""
        if self._ended:
            raise RuntimeError("push() after end()")
        if not delta:
            return []
        try:
            delta.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError("text delta holds a lone surrogate", field="text") from None
        self._pushed += len(delta)
        for raw, norm in self._nfc.push(delta):
            self._add_segment(raw, norm)
        return self._emit(final=False)

    def end(self) -> list[int]:
        """The text is complete: returns the remaining ids. Safe to call twice (returns [])."""
        if self._ended:
            return []
        for raw, norm in self._nfc.end():
            self._add_segment(raw, norm)
        self._ended = True
        return self._emit(final=True)

    # ------------------------------------------------------------------ internals

    def _add_segment(self, raw: str, norm: str) -> None:
        self._norm += norm
        self._norm_ends.extend(segment_char_ends(raw, norm, self._closed_raw))
        self._closed_raw += len(raw)

    def _emit(self, *, final: bool) -> list[int]:
        closed = len(self._norm)
        if final:
            text = self._norm
            cut = closed
        else:
            text = self._norm + unicodedata.normalize("NFC", self._nfc.open_segment)
        spans = self._tok.pretokenize(text)
        if not spans:
            return []
        if not final:
            cut = min(closed, spans[-1][0])  # rules 1 and 3
            ws = len(text)
            while ws > 0 and text[ws - 1].isspace():  # a superset of the regex's \s
                ws -= 1
            if ws < len(text):  # rule 2
                for s, e in reversed(spans):
                    if s <= ws < e:
                        cut = min(cut, s)
                        break
        out: list[int] = []
        done = 0
        n_done = 0
        for s, e in spans:
            if e > cut:
                break
            self._emit_piece(text[s:e], s, out)
            done = e
            n_done += 1
        if not final and self._eager and n_done == len(spans) - 1 and spans[-1][0] <= closed:
            s = spans[-1][0]
            open_seg = self._nfc.open_segment
            stable = 1 if open_seg and nfc_prefix_stable(open_seg[0]) else 0
            self._emit_inside(text[s : closed + stable], s, bool(stable), out)
        if done:
            self._norm = self._norm[done:]
            del self._norm_ends[:done]
        self._ids.extend(out)
        return out

    def _out(self, token_id: int, start: int, chars: int, out: list[int]) -> None:
        """One token whose bytes, with those before it, cover ``chars`` characters of the
        piece starting at ``start`` in ``_norm``."""
        if chars > 0:
            self._consumed = max(self._consumed, self._norm_ends[start + chars - 1])
        if self._skip_first:
            self._skip_first = False
            return
        out.append(token_id)
        self._char_ends.append(self._consumed)

    def _emit_piece(self, piece: str, start: int, out: list[int]) -> None:
        """A complete piece; the first piece of ``_norm`` may have been emitted in part."""
        if start == 0:
            self._stuck = None
        if start > 0 or self._head_bytes == 0:
            for t in self._tok.encode_piece(piece):
                self._out(t.id, start, t.char_end, out)
            return
        byte_ends = _char_byte_ends(piece)
        table = bytes_to_unicode()
        head = self._head_bytes
        data = piece.encode("utf-8")
        assert len(data) >= head, "an emitted piece prefix was not final"
        vocab = self._tok.bpe_vocab
        pos = head
        for w in bpe_run([table[c] for c in data[head:]], self._tok.merge_ranks):
            pos += len(w)
            self._out(vocab[w], start, bisect.bisect_right(byte_ends, pos), out)
        self._head_bytes = self._head_chars = 0

    def _emit_inside(self, known: str, start: int, open_last: bool, out: list[int]) -> None:
        """Emit the proven-final tokens of the last piece, whose known part is ``known``.
        ``open_last``: the last known character is still in the open NFC segment; its bytes
        count as known but no token that covers it is emitted yet (its raw offset, which
        :attr:`char_ends` reports, depends on the marks that may follow it)."""
        if not known or not _grows_only(known, self._tok.pretokenizer):
            return
        head = self._head_bytes if start == 0 else 0
        data = known.encode("utf-8")
        window = data[head : head + self._window]  # Q: the rest counts as unknown (sound)
        limit = min(len(window), len(data) - head - 1 if open_last else len(window))
        key = (len(window), limit)
        if limit <= 0 or (start == 0 and key == self._stuck):
            return  # same bytes, same verdict
        table = bytes_to_unicode()
        q = "".join(table[c] for c in window)
        log: list[tuple[int, int, int]] = []
        syms = bpe_run(q, self._tok.merge_ranks, log)
        ends: list[int] = []
        pos = 0
        for w in syms:
            pos += len(w)
            ends.append(pos)
        assert self._index is not None
        final_at = 0
        for i in range(len(ends) - 1, -1, -1):
            b = ends[i]
            if b <= limit and boundary_is_final(self._index, q, b, log, syms[i]):
                final_at = b
                break
        self._stuck = None if final_at else key
        if not final_at:
            return
        # characters wholly covered: count from the ones the head already covers
        done_chars = self._head_chars if start == 0 else 0
        byte_ends = _char_byte_ends(known[done_chars:], len(known[:done_chars].encode("utf-8")))
        vocab = self._tok.bpe_vocab
        for w, end in zip(syms, ends, strict=True):
            if end > final_at:
                break
            self._out(vocab[w], start, done_chars + bisect.bisect_right(byte_ends, head + end), out)
        self._head_bytes = head + final_at
        self._head_chars = done_chars + bisect.bisect_right(byte_ends, self._head_bytes)


def _grows_only(known: str, pretokenizer: str) -> bool:
    """Part A of the module docstring: whatever follows, the piece is ``known`` + more."""
    return _GROWING_PIECE[pretokenizer].fullmatch(known) is not None


def _char_byte_ends(text: str, n: int = 0) -> list[int]:
    """Byte offset (from ``n``) just past each character of ``text`` in UTF-8."""
    ends: list[int] = []
    for ch in text:
        n += len(ch.encode("utf-8"))
        ends.append(n)
    return ends
