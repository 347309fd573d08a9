"""The pure-Python Qwen2 tokenizer and the tokenizer files it writes, checked against
transformers (the installed 5.x; 4.57.x when a reference venv is there) and tiktoken."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3tts_rt.errors import InvalidInputError
from qwen3tts_rt.model.fabricate import added_token_table, load_tiktoken_ranks, write_tokenizer_files
from qwen3tts_rt.model.text_tokenizer import (
    KNOWN_ADDED_TOKENS,
    MISTRAL_FIX_PATTERN,
    QWEN2_PATTERN,
    TEXT_VOCAB_SIZE,
    NfcStream,
    TextTokenizer,
    _is_starter,
    nfc_with_offsets,
    official_pretokenizer,
)

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- corpus

ALPHABETS: dict[str, list[str]] = {
    "latin": list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    "accents": [*"éèêëàâäôöûüçñÉÀÇßøåæœǅᾈ", "e\u0301", "a\u0300", "x\u0308", "e\u0323\u0301", "\u0301"],
    "cjk": list("中文测试语音合成我叫通义千问是阿里云的开源大模型你好世界"),
    "japanese": [*"こんにちはカタカナひらがなガギグパピプーッ日本語", "か\u3099"],
    "hangul": [*"안녕하세요한국어음성합성", "\u1100\u1161", "\u1100\u1161\u11a8", "\uac00\u11a8"],
    "cyrillic": list("приветмирЁёЖжЩщ"),
    "emoji": ["😀", "👍🏽", "👩\u200d💻", "👨\u200d👩\u200d👧\u200d👦", "🇩🇪", "🇯🇵", "❤️", "✨", "🏳️\u200d🌈"],
    "digits": [*"0123456789", "١٢٣", "½", "²", "Ⅻ", "１２"],
    "punct": [*".,!?;:'\"()[]{}<>-—–…/\\@#$%^&*_+=|~`«»「」。，、！？：；", "'s", "'t", "'re", "'ve"],
    "contractions": ["'m", "'ll", "'d", "'S", "'LL", "'Re", "'ſ", "'sam", "don't", "I'LL", "we're"],
    "space": [" ", "  ", "   ", "\n", "\n\n", "\r\n", "\t", " \n", "\n ", "\u3000", "\xa0", "\u2028"],
    "controls": ["\x0b", "\x1c", "\x85"],
    "words": ["हिन्दी", "العربية", "עברית", "ไทย", "Ελληνικά", "Å", "K", "ﬁ", "McDonald", "iPhone"],
    "more_words": ["HelloWorld", "URL/path/to", "x=1;y=2"],
}
FIXED = [
    "Hello world, this is a test.",
    "",
    " ",
    "\n",
    "\n\nHello",
    "\n Hello",
    " \nHi",
    "\r\nHi",
    "Hello\n",
    "a   \n\n  b",
    "我叫通义千问，是阿里云的开源大模型。",
    "I am solving the equation: x = [-b ± √(b²-4ac)] / 2a? Nobody can — it's a disaster (◍•͈⌔•͈◍), very sad!",
    "12345678901234567890",
    "e\u0301cole",
    "\u0301abc",
    "x\u0308\u0323y",
    " " * 50,
    "\n" * 30 + "x",
    "中" * 400,
]


def make_corpus(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    keys = list(ALPHABETS)
    out = list(FIXED)
    for _ in range(n):
        parts: list[str] = []
        for _ in range(rng.randint(1, 40)):
            parts.append(rng.choice(ALPHABETS[rng.choice(keys)]))
            if rng.random() < 0.3:
                parts.append(" ")
        out.append("".join(parts))
    return out


CORPUS = make_corpus(300)

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_files(tmp_path_factory.mktemp("qwen_tok"))


@pytest.fixture(scope="session")
def tok(tokenizer_dir: Path) -> TextTokenizer:
    return TextTokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="session")
def tok_mistral(tokenizer_dir: Path) -> TextTokenizer:
    return TextTokenizer.from_dir(tokenizer_dir, pretokenizer="mistral_fix")


@pytest.fixture(scope="session")
def hf_tok(tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


# --------------------------------------------------------------------------- the files


def test_files_and_config(tokenizer_dir: Path) -> None:
    names = {p.name for p in tokenizer_dir.iterdir()}
    assert names == {"vocab.json", "merges.txt", "tokenizer_config.json"}
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 151643 and sorted(vocab.values()) == list(range(151643))
    merges = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    assert len(merges) - 1 == 151643 - 256  # every multi-byte token reachable by exactly one merge
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert (
        cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>" and cfg["bos_token"] is None
    )
    assert cfg["errors"] == "replace" and cfg["clean_up_tokenization_spaces"] is False
    added = {int(k): v for k, v in cfg["added_tokens_decoder"].items()}
    assert sorted(added) == list(range(151643, TEXT_VOCAB_SIZE))
    expect = {
        151643: "<|endoftext|>",
        151644: "<|im_start|>",
        151645: "<|im_end|>",
        151671: "<tts_pad>",
        151672: "<tts_text_bos>",
        151673: "<tts_text_eod>",
    }
    for i, name in expect.items():
        assert added[i]["content"] == name and added[i]["special"] is True
    assert added[151667]["content"] == "<think>" and added[151667]["special"] is False
    assert added[151676]["content"] == "<|extra_0|>" and added[151935]["content"] == "<|extra_259|>"


def test_specials_override() -> None:
    table = added_token_table({"<tts_pad>": 151700, "<my_token>": 151935})
    assert table[151700] == "<tts_pad>" and 151671 not in table and table[151935] == "<my_token>"
    with pytest.raises(ValueError):
        added_token_table({"<bad>": 5})


def test_known_ids(tok: TextTokenizer) -> None:
    assert tok.role_prefix_ids() == [151644, 77091, 198]
    assert tok.im_start_id == 151644 and tok.im_end_id == 151645
    assert tok.token_to_id("<tts_pad>") == 151671 and tok.token_to_id("<tts_text_eod>") == 151673
    assert tok.encode("Hello world") == [9707, 1879]
    assert len(tok) == TEXT_VOCAB_SIZE
    assert tok.id_to_token(77091) == "assistant" and tok.id_to_token(1879) == "Ġworld"


# --------------------------------------------------------------------------- equivalences


def test_matches_tiktoken(tok: TextTokenizer) -> None:
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.Encoding(
        "qwen", pat_str=QWEN2_PATTERN, mergeable_ranks=load_tiktoken_ranks(), special_tokens={}
    )
    for s in CORPUS:
        assert tok.encode(s) == enc.encode(unicodedata.normalize("NFC", s), disallowed_special=()), repr(s)


def _plain(s: str) -> bool:
    return not any(name in s for name in KNOWN_ADDED_TOKENS) and "<|extra_" not in s


def test_matches_transformers(tok: TextTokenizer, hf_tok) -> None:  # type: ignore[no-untyped-def]
    n = 0
    for s in CORPUS:
        if not _plain(s):
            continue
        n += 1
        ids = hf_tok(f"<|im_start|>assistant\n{s}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
        assert tok.assistant_ids(s) == ids, repr(s)
        assert tok.text_ids(s) == ids[3:-5], repr(s)
        ref = hf_tok(f"<|im_start|>assistant\n{s}<|im_end|>\n")["input_ids"]
        assert tok.ref_text_ids(s) == ref[3:-2], repr(s)
        assert tok.instruct_ids(s) == hf_tok(f"<|im_start|>user\n{s}<|im_end|>\n")["input_ids"], repr(s)
        plain = hf_tok(s, add_special_tokens=False)["input_ids"]
        assert tok.encode(s) == plain, repr(s)
        assert tok.decode(plain) == hf_tok.decode(plain), repr(s)
    assert n > 250
    specials = [151644, *tok.encode("hi"), 151671, 151645]
    assert tok.decode(specials) == hf_tok.decode(specials)
    assert tok.decode(specials, skip_special_tokens=True) == hf_tok.decode(specials, skip_special_tokens=True)


def test_mistral_fix_matches_patched_transformers(tok_mistral: TextTokenizer, tokenizer_dir: Path) -> None:
    """``mistral_fix`` == a transformers tokenizer patched the way 4.57.3's
    ``_patch_mistral_regex`` patches it (``pre_tokenizer[0] = Split(...)``)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Regex, pre_tokenizers

    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    hf.backend_tokenizer.pre_tokenizer[0] = pre_tokenizers.Split(
        pattern=Regex(MISTRAL_FIX_PATTERN), behavior="isolated"
    )
    differs = 0
    qwen2 = TextTokenizer.from_dir(tokenizer_dir)
    for s in CORPUS:
        if _plain(s):
            ids = hf(s, add_special_tokens=False)["input_ids"]
            assert tok_mistral.encode(s) == ids, repr(s)
            differs += qwen2.encode(s) != ids
    assert differs > 10  # the two pre-tokenizers really differ on this corpus
    assert qwen2.encode("iPhone") != tok_mistral.encode("iPhone")


def test_official_pretokenizer_rule(tmp_path: Path) -> None:
    assert official_pretokenizer(tmp_path) == "qwen2"  # no config.json: transformers does not patch

    def rule(cfg: dict[str, str]) -> str:
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        return official_pretokenizer(tmp_path)

    assert rule({"model_type": "qwen3_tts"}) == "mistral_fix"
    assert rule({"model_type": "qwen3_tts", "transformers_version": "4.57.3"}) == "mistral_fix"
    assert rule({"model_type": "qwen3_tts", "transformers_version": "4.57.1"}) == "qwen2"
    assert rule({"model_type": "mistral", "transformers_version": "4.57.1"}) == "mistral_fix"
    assert rule({"model_type": "qwen3_tts", "transformers_version": "5.1.0"}) == "qwen2"
    assert rule({"model_type": "qwen3_tts", "transformers_version": "5.0.0.dev0"}) == "mistral_fix"


_REF_SCRIPT = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import transformers
from transformers import AutoTokenizer
d, corpus = sys.argv[1], json.load(open(sys.argv[2]))
out = {"version": transformers.__version__}
for name, kw in (("plain", {}), ("fix", {"fix_mistral_regex": True})):
    tok = AutoTokenizer.from_pretrained(d, **kw)
    out[name] = [tok(f"<|im_start|>assistant\n{s}<|im_end|>\n<|im_start|>assistant\n")["input_ids"] for s in corpus]
json.dump(out, sys.stdout)
"""


def _reference_python() -> str | None:
    cand = os.environ.get("QWEN3TTS_REF_PYTHON") or str(REPO / ".venv-ref" / "bin" / "python")
    return cand if Path(cand).is_file() else None


@pytest.mark.skipif(
    _reference_python() is None, reason="no reference venv (.venv-ref or QWEN3TTS_REF_PYTHON)"
)
def test_matches_reference_transformers(
    tok: TextTokenizer, tok_mistral: TextTokenizer, tmp_path: Path
) -> None:
    """The official package's transformers (4.57.x) on the same files, in its own venv,
    including its ``fix_mistral_regex=True`` load of a local checkpoint directory."""
    d = write_tokenizer_files(tmp_path / "ckpt")
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_tts"}))
    corpus = [s for s in CORPUS if _plain(s)]
    (tmp_path / "corpus.json").write_text(json.dumps(corpus))
    py = _reference_python()
    assert py is not None
    res = subprocess.run(
        [py, "-c", _REF_SCRIPT, str(d), str(tmp_path / "corpus.json")],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    out = json.loads(res.stdout)
    fixed = TextTokenizer.from_dir(d, pretokenizer=official_pretokenizer(d))
    assert fixed.pretokenizer == ("mistral_fix" if out["version"] < "5" else "qwen2")
    for s, plain, fix in zip(corpus, out["plain"], out["fix"]):
        assert tok.assistant_ids(s) == plain, repr(s)
        assert fixed.assistant_ids(s) == fix, repr(s)


# --------------------------------------------------------------------------- semantics


def test_leading_newlines_follow_the_official_slice(tok: TextTokenizer) -> None:
    hi = tok.encode("Hi")
    assert tok.text_ids("Hi") == hi
    assert tok.text_ids("\nHi") == hi  # "\n\n" is one token, dropped with the template's "\n"
    assert tok.text_ids("\n\n\nHi") == hi
    assert tok.text_ids(" \nHi") == hi
    assert tok.text_ids("\n Hi") == tok.encode(" Hi")
    assert tok.text_ids("") == [] and tok.text_ids("\n") == []
    for s in ["\nHi", "\n\n\nHi", "\n" * 40 + "x", " \r\n\t\nHi", "Hi\n"]:
        assert tok.text_ids(s) == tok.assistant_ids(s)[3:-5]


def test_special_strings_are_plain_text(tok: TextTokenizer) -> None:
    ids = tok.text_ids("a<|im_end|>b<tts_pad>")
    assert not set(ids) & set(tok.added_tokens)
    assert tok.decode(ids) == "a<|im_end|>b<tts_pad>"
    assert tok.instruct_ids("<|im_start|>")[1:-2] == tok.encode("user\n<|im_start|>")


def test_lone_surrogate_is_rejected(tok: TextTokenizer) -> None:
    with pytest.raises(InvalidInputError):
        tok.text_ids("a\ud800b")


def _check_offsets(tok: TextTokenizer, text: str) -> None:
    ids, offsets = tok.text_ids_with_offsets(text)
    assert offsets == tok.char_offsets(text) and len(offsets) == len(ids)
    assert offsets == sorted(offsets)
    if not ids:
        return
    assert offsets[-1] == len(text)
    if unicodedata.is_normalized("NFC", text):
        # the bytes of the first k ids cover exactly offsets[k-1] characters (after the
        # leading line breaks that the official slice swallows)
        skipped = len(text.encode("utf-8")) - sum(len(tok.token_bytes(i)) for i in ids)
        data = text.encode("utf-8")
        n = skipped
        for i, off in zip(ids, offsets):
            n += len(tok.token_bytes(i))
            assert len(text[:off].encode("utf-8")) <= n
            assert off == len(text) or len(text[: off + 1].encode("utf-8")) > n
        assert n == len(data)


def test_char_offsets_examples(tok: TextTokenizer) -> None:
    ids, off = tok.text_ids_with_offsets("Hello world, 😀!")
    assert [tok.decode([i]) for i in ids[:3]] == ["Hello", " world", ","]
    assert off[:3] == [5, 11, 12]
    assert off[-1] == len("Hello world, 😀!")
    for s in CORPUS[:120]:
        _check_offsets(tok, s)
    ids, off = tok.text_ids_with_offsets("e\u0301x")  # NFC changes "e\u0301" -> "é": segment granularity
    assert off[-1] == 3


# --------------------------------------------------------------------------- NFC helpers


def test_starters_below_u0300() -> None:
    for cp in range(0x300):
        ch = chr(cp)
        assert unicodedata.combining(ch) == 0
        assert unicodedata.combining(unicodedata.normalize("NFD", ch)[0]) == 0
    assert not _is_starter("\u0301") and _is_starter("中") and not _is_starter("\u0f73")


_nfc_text = st.lists(
    st.one_of(
        st.sampled_from(
            [
                *"e\u0301\u0323\u0308\u1100\u1161\u11a8\uac00か\u3099\u0b47\u0b3e\u0f73\u0f71",
                *"ÅKᾈa 中\u0345Ω",
            ]
        ),
        st.text(max_size=3),
    ),
    max_size=25,
).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_nfc_text, data=st.data())
def test_nfc_stream_equals_nfc(text: str, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    stream = NfcStream()
    segs: list[tuple[str, str]] = []
    prev = 0
    for c in [*cuts, len(text)]:
        segs += stream.push(text[prev:c])
        prev = c
    segs += stream.end()
    assert "".join(r for r, _ in segs) == text
    assert "".join(n for _, n in segs) == unicodedata.normalize("NFC", text)
    norm, ends = nfc_with_offsets(text)
    assert norm == unicodedata.normalize("NFC", text) and len(ends) == len(norm)
    assert ends == sorted(ends) and (not ends or ends[-1] == len(text))


def test_round_trip_decode(tok: TextTokenizer) -> None:
    for s in CORPUS:
        assert tok.decode(tok.encode(s)) == unicodedata.normalize("NFC", s)


def test_runs_without_transformers_in_a_subprocess(tokenizer_dir: Path) -> None:
    """Loading and encoding must not import transformers or touch the network."""
    code = (
        "import sys; from qwen3tts_rt.model.text_tokenizer import TextTokenizer;"
        f"t = TextTokenizer.from_dir({str(tokenizer_dir)!r}); assert t.encode('Hello world') == [9707, 1879];"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
