"""Brute-force oracle for the eager incremental tokenizer (issue 18).

After every push, each id emitted so far must equal the id at the same place in the whole-text
ids of *every* longer prefix of the text (and of the whole text): nothing emitted may ever be
taken back, whatever the text turns out to be. Checked with the real Qwen vocabulary on long
Chinese, Japanese and Korean runs, runs mixed with digits and Latin, emoji and other multi-byte
characters, NFC-sensitive sequences and runs whose BPE boundaries move late (found by searching
the vocabulary, see ``LATE_MOVERS``), and with random merge tables (the criterion must hold for
any checkpoint's merges, not only Qwen's)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3tts_rt.engine.incremental_tokenizer import (
    IncrementalTokenizer,
    MergeIndex,
    boundary_is_final,
    bpe_run,
    composition_firsts,
    nfc_prefix_stable,
)
from qwen3tts_rt.model.fabricate import write_tokenizer_files
from qwen3tts_rt.model.text_tokenizer import IM_END, IM_START, TextTokenizer, bytes_to_unicode


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TextTokenizer]:
    d = write_tokenizer_files(tmp_path_factory.mktemp("qwen_tok_oracle"))
    return {
        "qwen2": TextTokenizer.from_dir(d),
        "mistral_fix": TextTokenizer.from_dir(d, pretokenizer="mistral_fix"),
    }


# Whole tokens of the Qwen vocabulary whose BPE boundaries move furthest back when their last
# characters arrive (a boundary of a prefix that is not one of a longer prefix, that many
# characters before the end of the longer prefix), from a search over all letter tokens;
# ``test_late_movers_are_late`` keeps the list honest.
LATE_MOVERS = {
    "のではないでしょうか": 9,
    "ありがとうございました": 8,
    "することができます": 7,
    "なければならない": 7,
    "コミュニケーション": 5,
    "インターネット": 5,
    "하겠습니다": 4,
    "迫不及待": 3,
    "这意味着": 3,
    "院副院长": 3,
    "latesAutoresizingMaskIntoConstraints": 31,
    " dequeueReusableCellWithIdentifier": 31,
    "abcdefghijklmnopqrstuvwxyz": 23,
}

CORPUS = [
    # long CJK runs without punctuation (one pre-tokenizer piece each)
    "我们今天下午在公司楼下的咖啡馆里讨论了明年新产品的设计方案和市场推广计划大家都很满意",
    "中华人民共和国成立于一九四九年十月一日首都北京是全国的政治文化中心",
    "这意味着迫不及待的院副院长这是一种还有一些鸟成长记",
    # Japanese: kanji, hiragana (that take voicing marks), katakana, long tokens
    "のではないでしょうかありがとうございましたすることができますなければならない",
    "東京都内のホテルでインターネットとコミュニケーションのプロジェクトについて話しました",
    # Korean, precomposed and as conjoining jamo (NFC composes them across deltas)
    "안녕하세요하겠습니다감사합니다프로그램\u1112\u1161\u11ab\u1100\u116e\u11a8\u110b\u1165",
    # mixed with digits and Latin
    "我有3个iPhone和12台MacBook在2024年买的Pro版本共花了9999元",
    "東京2020オリンピックでGoldメダルを3個獲得latesAutoresizingMaskIntoConstraints",
    " dequeueReusableCellWithIdentifierabcdefghijklmnopqrstuvwxyz internationalization",
    # emoji and other multi-byte characters (4-byte Han, ZWJ sequences, flags)
    "你好😀世界👨\u200d👩\u200d👧测试🇯🇵日本𠮷野家𩸽定食👍🏽好的",
    # NFC-sensitive: combining voicing marks, decomposed Latin, reordered marks, Hangul jamo
    "か\u3099きく\u3099さ\u309aテ\u3099ータe\u0301te\u0301q\u0323\u0307a\u0308\u0304ḱ\u1100\u1161\u11a8가\u11a8",
    "Ｆｕｌｌｗｉｄｔｈ文字ﬁﬂ和ǅ字Ω与Å和K的",
    # apostrophes and contractions next to letters
    "it's I'LL we'd 'sam's' 'llama 'reader",
]


def _prefix_table(tok: TextTokenizer, text: str, official: bool) -> list[tuple[list[int], list[int]]]:
    if official:
        return [tok.text_ids_with_offsets(text[:m]) for m in range(len(text) + 1)]
    return [(tok.encode(text[:m]), []) for m in range(len(text) + 1)]


def oracle_check(
    tok: TextTokenizer, text: str, *, official: bool = True, cuts: list[int] | None = None
) -> None:
    """Push ``text`` in the deltas given by ``cuts`` (default: one character at a time); after
    every push, the ids (and char_ends) out so far are a prefix of those of every longer prefix."""
    table = _prefix_table(tok, text, official)
    inc = IncrementalTokenizer(tok, official_slice=official)
    points = sorted({c for c in (cuts if cuts is not None else range(len(text) + 1)) if 0 < c < len(text)})
    prev = 0
    for c in [*points, len(text)]:
        inc.push(text[prev:c])
        prev = c
        got, ends = list(inc.ids), list(inc.char_ends)
        for m in range(c, len(text) + 1):
            ids_m, offsets_m = table[m]
            assert got == ids_m[: len(got)], (text[:c], m)
            if official:
                assert ends == offsets_m[: len(ends)], (text[:c], m)
    inc.end()
    assert list(inc.ids) == table[-1][0]
    if official:
        assert list(inc.char_ends) == table[-1][1]


# --------------------------------------------------------------------------- the real vocabulary


def test_late_movers_are_late(toks: dict[str, TextTokenizer]) -> None:
    tok = toks["qwen2"]

    def bounds(s: str) -> set[int]:
        return {t.char_end for t in tok.encode_piece(s)}

    for word, late in LATE_MOVERS.items():
        assert len(tok.encode_piece(word)) == 1, word  # one token in the vocabulary
        n = len(word)
        b = [bounds(word[:k]) for k in range(n + 1)]
        moved = max(
            (
                m - x
                for k in range(1, n)
                for m in range(k + 1, n + 1)
                for x in b[k]
                if 0 < x < k and x not in b[m]
            ),
            default=0,
        )
        assert moved == late, word


@pytest.mark.parametrize("text", CORPUS)
def test_oracle_char_by_char(toks: dict[str, TextTokenizer], text: str) -> None:
    oracle_check(toks["qwen2"], text)
    oracle_check(toks["mistral_fix"], text)


@pytest.mark.parametrize("text", [CORPUS[0], CORPUS[3], CORPUS[7], CORPUS[10]])
def test_oracle_plain_encode(toks: dict[str, TextTokenizer], text: str) -> None:
    oracle_check(toks["qwen2"], text, official=False)


@pytest.mark.parametrize("word", list(LATE_MOVERS))
def test_oracle_late_movers_in_context(toks: dict[str, TextTokenizer], word: str) -> None:
    """Each late mover alone, twice in a row, and cut one character short then continued
    with another letter (the boundary that moved back must not have been emitted)."""
    for text in (word, word + word, word[:-1] + "的" + word, word[:-1] + "x" + word[:-2]):
        oracle_check(toks["qwen2"], text)


# Fragments for random texts: CJK runs, kana with voicing marks, Hangul jamo, digits, Latin,
# emoji (ZWJ, skin tones, flags, variation selectors), combining marks, late movers and prefixes.
FRAGMENTS = [
    *"我们今天下午在公司楼的咖啡馆里讨论了明年新产品设计方案和市场推广计划大家都很满意中华人民共和国",
    *["中文", "测试", "一个", "这是", "北京", "上海", "人工智能", "𠮷", "𩸽", "々", "〇"],
    *"のではないでしょうかありがとうございましたすることができますなければならない",
    *["か", "\u3099", "\u309a", "ガ", "テ", "ー", "カタカナ", "コミュニケーション", "インターネット"],
    *["\u1100", "\u1161", "\u11a8", "\uac00", "안녕", "하겠습니다", "습니다"],
    *["0", "1", "2", "3", "42", "2024", "٣", "½", "１２"],
    *["iPhone", "Mac", "Pro", "a", "b", "x", "The", " the", "'s", "'ll", "'", "Ab", "CD", "ǅ"],
    *["latesAutoresizing", "MaskIntoConstraints", "abcdefghijklm", "nopqrstuvwxyz", "e\u0301", "\u0301"],
    *["😀", "👍", "🏽", "👩", "\u200d", "💻", "🇯", "🇵", "❤", "\ufe0f", "\u0323", "\u0307"],
    *[" ", "，", "。", "、", "！", "?", "\n", "  "],
]
FRAGMENTS += list(LATE_MOVERS)
FRAGMENTS += [w[: len(w) // 2] for w in LATE_MOVERS] + [w[len(w) // 2 :] for w in LATE_MOVERS]

texts = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=18).map("".join)


@st.composite
def text_and_cuts(draw: st.DrawFn) -> tuple[str, list[int]]:
    text = draw(texts)
    return text, draw(st.lists(st.integers(0, len(text)), max_size=12))


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=text_and_cuts())
def test_oracle_random_splits(toks: dict[str, TextTokenizer], case: tuple[str, list[int]]) -> None:
    text, cuts = case
    oracle_check(toks["qwen2"], text, cuts=cuts)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=text_and_cuts())
def test_oracle_random_splits_mistral_fix(
    toks: dict[str, TextTokenizer], case: tuple[str, list[int]]
) -> None:
    text, cuts = case
    oracle_check(toks["mistral_fix"], text, cuts=cuts)


# --------------------------------------------------------------------------- any merge table

ALPHABET = ["a", "b", "c", "é", "中"]  # 1-, 2- and 3-byte letters: merges may split characters


@st.composite
def merge_tables(draw: st.DrawFn) -> TextTokenizer:
    """A random merge table over the bytes of ``ALPHABET``: each merge joins two symbols that
    exist by then, and the ranks are then shuffled or not, so that a merge may rank below the
    merges that make its parts (no real trainer does that; the criterion must not care)."""
    table = bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    pool = sorted({table[b] for ch in ALPHABET for b in ch.encode("utf-8")})
    merges: list[tuple[str, str]] = []
    for _ in range(draw(st.integers(1, 24))):
        a = draw(st.sampled_from(pool))
        b = draw(st.sampled_from(pool))
        if (a, b) in merges:
            continue
        merges.append((a, b))
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            pool.append(a + b)
    if draw(st.booleans()):
        merges = draw(st.permutations(merges))
    added = {len(vocab): IM_START, len(vocab) + 1: IM_END}
    return TextTokenizer(vocab, merges, added)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(tok=merge_tables(), parts=st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=24), data=st.data())
def test_oracle_random_merge_tables(tok: TextTokenizer, parts: list[str], data: st.DataObject) -> None:
    text = "".join(parts)
    oracle_check(tok, text)
    oracle_check(tok, text, official=False, cuts=data.draw(st.lists(st.integers(0, len(text)), max_size=6)))


def test_hand_made_tables() -> None:
    """Boundaries that move late by construction: ``c d`` < ``b cd`` < ``a bcd``, so ``abc``
    tokenizes ``a b c`` but ``abcd`` is one token; and a table whose merges rank below the
    merges that make their parts."""
    table = bytes_to_unicode()
    base = {table[b]: b for b in range(256)}
    for merges in (
        [("c", "d"), ("b", "cd"), ("a", "bcd")],
        [("a", "bcd"), ("b", "cd"), ("c", "d"), ("a", "b")],
        [("a", "a"), ("aa", "a"), ("aa", "aa"), ("aa", "aaa")],
        [("aaaa", "a"), ("aa", "aa"), ("a", "a")],
    ):
        vocab = dict(base)
        for a, b in merges:
            vocab.setdefault(a + b, len(vocab))
        tok = TextTokenizer(vocab, merges, {len(vocab): IM_START, len(vocab) + 1: IM_END})
        for text in ("abcd", "abcabcdabc", "dcdbcdabcdab", "a" * 13, "aaaabaaaaab"):
            oracle_check(tok, text)


# --------------------------------------------------------------------------- the pieces of the proof


def test_bpe_run_matches_the_tokenizer(toks: dict[str, TextTokenizer]) -> None:
    tok = toks["qwen2"]
    table = bytes_to_unicode()
    for text in [*CORPUS, *LATE_MOVERS]:
        for s, e in tok.pretokenize(text):
            piece = text[s:e]
            syms = [table[b] for b in piece.encode("utf-8")]
            log: list[tuple[int, int, int]] = []
            words = bpe_run(syms, tok.merge_ranks, log)
            assert [tok.bpe_vocab[w] for w in words] == [t.id for t in tok.encode_piece(piece)]
            assert len(log) == len(syms) - len(words)


def test_boundary_criterion_on_known_cases(toks: dict[str, TextTokenizer]) -> None:
    """At the BPE level alone: a boundary the criterion calls final for a prefix of a late
    mover is a token end of every longer prefix."""
    tok = toks["qwen2"]
    index = MergeIndex(tok.merge_ranks)
    table = bytes_to_unicode()

    def token_ends(text: str, log: list[tuple[int, int, int]] | None = None) -> list[int]:
        q = "".join(table[b] for b in text.encode("utf-8"))
        ends: list[int] = []
        for w in bpe_run(q, tok.merge_ranks, log):
            ends.append((ends[-1] if ends else 0) + len(w))
        return ends

    certified = 0
    for word in [*LATE_MOVERS, CORPUS[0], CORPUS[1]]:
        later = [set(token_ends(word[:m])) for m in range(len(word) + 1)]
        for k in range(1, len(word)):
            q = "".join(table[b] for b in word[:k].encode("utf-8"))
            log: list[tuple[int, int, int]] = []
            ends = token_ends(word[:k], log)
            for i, b in enumerate(ends):
                if boundary_is_final(index, q, b, log, q[ends[i - 1] if i else 0 : b]):
                    certified += 1
                    assert all(b in later[m] for m in range(k, len(word) + 1)), (word, k, b)
    assert certified > 50
    with pytest.raises(ValueError):
        MergeIndex(tok.merge_ranks, tables_kept=0)
    with pytest.raises(ValueError):
        IncrementalTokenizer(tok, eager_window=0)


def test_nfc_prefix_stable() -> None:
    """The open NFC segment's first character counts as known only when nothing after it can
    change it: checked against NFC itself for every mark that composes with something."""
    import unicodedata

    assert nfc_prefix_stable("中") and nfc_prefix_stable("𠮷") and nfc_prefix_stable("ん")
    assert not nfc_prefix_stable("か")  # か + \u3099 -> が
    assert not nfc_prefix_stable("e") and not nfc_prefix_stable("\u1100")  # e + \u0301, L + V jamo
    assert not nfc_prefix_stable("\u0301") and not nfc_prefix_stable("é")  # a mark; not its own NFD
    seconds = set()
    for cp in range(0x110000):
        d = unicodedata.decomposition(chr(cp))
        if d and d[0] != "<":
            assert cp < 0x30000  # the scan in composition_firsts stops there
            parts = d.split()
            if len(parts) == 2:
                seconds.add(chr(int(parts[1], 16)))
    seconds |= {chr(cp) for cp in range(0x1161, 0x1176)} | {chr(cp) for cp in range(0x11A8, 0x11C3)}
    firsts = composition_firsts()
    for ch in sorted(set("".join(CORPUS + FRAGMENTS))):
        if nfc_prefix_stable(ch):
            assert ch not in firsts
            for m in seconds:
                assert unicodedata.normalize("NFC", ch + m)[0] == ch, (ch, m)
