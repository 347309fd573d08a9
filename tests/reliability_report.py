"""Run the reliability tests (soak included) and render ``docs/RELIABILITY.md`` from what
they measured (``tests/reliability.py`` ``record`` calls) and from pytest's own results.

    .venv/bin/python -m tests.reliability_report              # what `make reliability` runs
    .venv/bin/python -m tests.reliability_report --out /tmp/R.md -- -x   # extra pytest args

Test files that do not exist (yet) are skipped with a note in the report. The report is
written whatever the outcome; the exit status is pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# (file, what it covers), in the order of the report
FILES: list[tuple[str, str]] = [
    ("tests/test_bad_input.py", "malformed and hostile input"),
    ("tests/test_fuzz_streams.py", "fuzzed request streams"),
    ("tests/test_security.py", "security rules"),
    ("tests/test_voice_store_faults.py", "voice store faults"),
    ("tests/test_agent_limits.py", "agent limits"),
    ("tests/test_server_errors.py", "error codes of the server"),
    ("tests/test_engine_faults.py", "faults inside the engine"),
    ("tests/test_faults.py", "client faults and SIGTERM drain"),
    ("tests/test_load.py", "load and soak"),
    ("tests/test_server_limits.py", "server-wide queue limits"),
    ("tests/test_dos.py", "denial of service and memory amplification"),
    ("tests/test_auth_order.py", "auth ordering"),
    ("tests/test_server_utterances.py", "idle holds, utterance ids and cloning neighbours"),
]
MAX_CELL = 400  # characters of one table cell
MAX_TESTS_LISTED = 40  # per file; beyond it tests are summarised per test function


@dataclass
class FileResult:
    path: str
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    tests: list[tuple[str, str, float, str]] = field(default_factory=list)  # name, outcome, s, message

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.errors + self.skipped


# --------------------------------------------------------------------------- running


def run_pytest(files: list[str], records: Path, junit: Path, extra: list[str]) -> tuple[int, str, float]:
    """pytest on ``files`` with every marker selected; its output is shown as it runs.
    Returns (exit status, last lines of output, seconds)."""
    cmd = [
        sys.executable, "-m", "pytest", "-m", "", "-p", "no:cacheprovider", "-rfE",
        f"--junitxml={junit}", *files, *extra,
    ]  # fmt: skip
    env = {**os.environ, "RELIABILITY_OUT": str(records)}
    print("+", shlex.join(cmd), flush=True)
    t0 = time.monotonic()
    tail: list[str] = []
    with subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            tail = [*tail[-199:], line.rstrip("\n")]
        rc = proc.wait()
    return rc, "\n".join(tail), time.monotonic() - t0


def parse_junit(junit: Path) -> dict[str, FileResult]:
    results: dict[str, FileResult] = {}
    if not junit.exists():
        return results
    for case in ET.parse(junit).getroot().iter("testcase"):
        classname = case.get("classname", "")
        name = case.get("name", "")
        path = case.get("file") or classname.replace(".", "/") + ".py"
        m = re.match(r"(tests/test_\w+)", classname.replace(".", "/"))
        if m:
            path = m.group(1) + ".py"
        res = results.setdefault(path, FileResult(path))
        seconds = float(case.get("time", 0) or 0)
        res.seconds += seconds
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                message = (child.get("message") or child.text or "").strip()
            elif child.tag == "skipped":
                outcome = "skipped"
                message = (child.get("message") or "").strip()
        if outcome == "passed":
            res.passed += 1
        elif outcome == "failed":
            res.failed += 1
        elif outcome == "error":
            res.errors += 1
        else:
            res.skipped += 1
        res.tests.append((name, outcome, seconds, message))
    return results


def load_records(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


# --------------------------------------------------------------------------- rendering


def cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value)
    text = " ".join(text.split())
    if len(text) > MAX_CELL:
        text = text[: MAX_CELL - 1] + "…"
    return text.replace("|", "\\|")


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return out


def section_tables(rows: list[dict[str, Any]]) -> list[str]:
    """One table per set of figure names (records of one kind share their columns)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        keys = tuple(k for k in r if k not in ("section", "item", "at"))
        groups.setdefault(keys, []).append(r)
    out: list[str] = []
    for keys, group in groups.items():
        header = ["what was tried", *(k.replace("_", " ") for k in keys)]
        out += table(header, [[r.get("item", ""), *(r.get(k, "") for k in keys)] for r in group])
        out.append("")
    return out


def machine() -> dict[str, str]:
    info = {"cpus": str(os.cpu_count()), "python": platform.python_version(), "platform": platform.platform()}
    try:
        import psutil

        info["ram"] = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:  # pragma: no cover
        info["ram"] = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    for mod in ("torch", "grpc"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:  # pragma: no cover
            info[mod] = "?"
    return info


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit} (with uncommitted changes)" if dirty else commit


def headline(message: str) -> str:
    """The informative part of a failure message (a gRPC error's status and details)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    picked = [ln for ln in lines if ln.startswith(("status =", "details ="))]
    return " ".join(picked) if picked else (lines[0] if lines else "")


def summary_line(tail: str) -> str:
    for line in reversed(tail.splitlines()):
        if re.search(r"\b(passed|failed|error|skipped|no tests ran)\b", line) and " in " in line:
            return line.strip("= ").strip()
    return "(no pytest summary line)"


def render(
    *,
    started: str,
    seconds: float,
    rc: int,
    tail: str,
    present: list[tuple[str, str]],
    missing: list[tuple[str, str]],
    results: dict[str, FileResult],
    records: list[dict[str, Any]],
) -> str:
    m = machine()
    totals = FileResult("all")
    for r in results.values():
        totals.passed += r.passed
        totals.failed += r.failed
        totals.errors += r.errors
        totals.skipped += r.skipped
    lines = [
        "# Reliability",
        "",
        "What was tried against the server and the agent, and what was measured: malformed input,",
        "injected faults, load held, memory growth. Generated by `make reliability`",
        "(`.venv/bin/python -m tests.reliability_report`) from the figures the tests record;",
        "do not edit by hand. Everything runs on the tiny random-weight checkpoint on CPU.",
        "",
        "## This run",
        "",
        f"* date: {started} UTC; duration {seconds / 60:.1f} min",
        f"* machine: {m.get('cpus')} CPUs ({m.get('cpu', '?')}), {m.get('ram')} RAM; {m.get('platform')}",
        f"* software: Python {m.get('python')}, torch {m.get('torch')}, grpcio {m.get('grpc')}",
        f"* git commit: {git_commit()}",
        f"* tests: {totals.total} run: {totals.passed} passed, {totals.failed} failed, "
        f'{totals.errors} errors, {totals.skipped} skipped (soak included: `pytest -m ""`)',
        f"* pytest: `{summary_line(tail)}` (exit status {rc})",
        "",
        "| test file | covers | passed | failed | errors | skipped | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for path, what in present:
        r = results.get(path, FileResult(path))
        lines.append(
            f"| `{path}` | {what} | {r.passed} | {r.failed} | {r.errors} | {r.skipped} | {r.seconds:.1f} |"
        )
    for path, what in missing:
        lines.append(f"| `{path}` | {what} | | | | | |")
    lines.append("")

    failures = [(p, t) for p, r in results.items() for t in r.tests if t[1] in ("failed", "error")]
    if failures:
        lines += ["## Failures", ""]
        lines += table(
            ["test", "outcome", "message"],
            [[f"`{p}::{name}`", outcome, headline(msg)] for p, (name, outcome, _, msg) in failures],
        )
        lines.append("")

    by_section: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in records:
        by_section[str(row.get("section", "other"))].append(row)
    lines += ["## Figures", ""]
    if not records:
        lines += ["No figures were recorded in this run.", ""]
    for section, rows in by_section.items():
        lines += [f"### {section}", ""]
        lines += section_tables(rows)

    lines += ["## Every test", ""]
    for path, _ in present:
        r = results.get(path)
        if r is None or not r.tests:
            continue
        lines += [f"### `{path}`", ""]
        if len(r.tests) <= MAX_TESTS_LISTED:
            lines += table(
                ["test", "outcome", "seconds"],
                [[f"`{name}`", outcome, f"{s:.2f}"] for name, outcome, s, _ in r.tests],
            )
        else:  # many parametrized cases: one row per test function
            agg: dict[str, list[float]] = {}
            outcomes: dict[str, dict[str, int]] = {}
            for name, outcome, s, _ in r.tests:
                fn = name.split("[", 1)[0]
                agg.setdefault(fn, []).append(s)
                outcomes.setdefault(fn, defaultdict(int))[outcome] += 1
            lines += table(
                ["test", "cases", "outcomes", "seconds"],
                [
                    [
                        f"`{fn}`",
                        len(ss),
                        ", ".join(f"{k} {v}" for k, v in sorted(outcomes[fn].items())),
                        f"{sum(ss):.2f}",
                    ]
                    for fn, ss in agg.items()
                ],
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "RELIABILITY.md")
    ap.add_argument("--files", nargs="+", help="run only these of the reliability test files")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    a = ap.parse_args(argv)
    chosen = [(p, w) for p, w in FILES if a.files is None or p in a.files]
    present = [(p, w) for p, w in chosen if (REPO / p).exists()]
    missing = [
        (p, f"{w}: not present in this checkout, skipped") for p, w in chosen if not (REPO / p).exists()
    ]
    missing += [(p, f"{w}: not run this time (--files)") for p, w in FILES if (p, w) not in chosen]
    for p, why in missing:
        print(f"note: {p}: {why}", flush=True)
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        records_path, junit = Path(tmp) / "records.jsonl", Path(tmp) / "junit.xml"
        records_path.touch()
        rc, tail, seconds = run_pytest([p for p, _ in present], records_path, junit, a.pytest_args)
        text = render(
            started=started,
            seconds=seconds,
            rc=rc,
            tail=tail,
            present=present,
            missing=missing,
            results=parse_junit(junit),
            records=load_records(records_path),
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text, encoding="utf-8")
    print(
        f"wrote {a.out.relative_to(REPO) if a.out.is_relative_to(REPO) else a.out} (pytest exit status {rc})"
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())
