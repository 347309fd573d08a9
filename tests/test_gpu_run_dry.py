"""The GPU run (``benchmarks/gpu_run.sh``, issue 16) end to end on the CPU: the same script,
stages and outputs as on the lent GPU machine, on the tiny preset (``--device cpu --preset
tiny``), so that a session that gets a GPU runs a script known to work and never debugs it
on the clock. Asserts order, counts, names and sizes, never a time."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import gpu_run

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("bfloat16-graphs", "bfloat16-eager", "float32-graphs", "float32-eager")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work, out = tmp_path_factory.mktemp("gpu-run-work"), tmp_path_factory.mktemp("gpu-run-out")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHON"] = sys.executable
    argv = ["bash", "benchmarks/gpu_run.sh", "--device", "cpu", "--preset", "tiny"]
    argv += ["--work", str(work), "--out", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{shlex.join(argv)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    summary = json.loads((out / "summary.json").read_text())
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    return {"out": out, "work": work, "summary": summary, "archive": names, "stdout": proc.stdout}


def test_every_stage_ran_in_order(dry_run: dict[str, Any]) -> None:
    stages = dry_run["summary"]["stages"]
    names = [s["name"] for s in stages]
    # setup first; the checkpoint build is reported when the first stage that needs it waits
    assert names[0] == "setup"
    assert [n for n in names if n in gpu_run.STAGE_ORDER] == list(gpu_run.STAGE_ORDER)
    assert names.count("checkpoint_tiny") == 1  # the main and big roles share the tiny build
    assert names.index("checkpoint_tiny") < names.index("gpu_check")
    assert {s["name"]: s["status"] for s in stages} == dict.fromkeys(names, "ok"), stages
    setup = dry_run["summary"]["setup"]
    assert setup["installed_wheels"] == [] and setup["missing_after"] == []  # the venv has it all


def test_out_fits_the_device_tool(dry_run: dict[str, Any]) -> None:
    out: Path = dry_run["out"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert files == ["results.tar.gz", "run.log", "summary.json", "summary.md"]
    assert len(files) <= gpu_run.OUT_MAX_FILES
    for name in files:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name)
        assert (out / name).stat().st_size <= gpu_run.OUT_MAX_FILE_BYTES
    log = (out / "run.log").read_text()
    for name in ("setup", *gpu_run.STAGE_ORDER):
        assert f"===== {name} =====" in log


def test_archive_holds_the_result_folders(dry_run: dict[str, Any]) -> None:
    dirs = dry_run["summary"]["result_dirs"]
    main, big = dirs["main"], dirs["big"]
    assert re.fullmatch(r"cpu-tiny-\d{4}-\d\d-\d\d", main) and big == f"{main}-big"
    want = {f"{main}/{n}" for n in ("gpu_check.json", "bench.json", "bench.md", "gpu_run.md", "gpu_run.json")}
    want |= {f"{main}/{n}" for n in ("pytest_gpu.xml", "compat_tests.xml", "first_packet_cdf.png")}
    want |= {f"{main}/engine_cost-{v}.json" for v in VARIANTS}
    want |= {f"{big}/engine_cost-bfloat16-graphs.json", f"{big}/bench.json"}
    want |= {f"logs/{n}.log" for n in ("setup", "checkpoint_tiny", *gpu_run.STAGE_ORDER)}
    assert want <= dry_run["archive"], sorted(want - dry_run["archive"])
    assert any(n.startswith("logs/bench-") and n.endswith("server.log") for n in dry_run["archive"])


def test_summary_reads_back_every_stage(dry_run: dict[str, Any]) -> None:
    r = dry_run["summary"]["results"]
    assert r["pytest_gpu"]["tests"] == 1 and r["pytest_gpu"]["skipped"] == 1  # no CUDA here
    check = r["gpu_check"]
    assert check["cases"] == 2 and check["max_frames"] == 4
    # on a CPU the engine's static path and synthesize's dynamic path give the same frames
    fp32 = check["fp32_engine_vs_synthesize"]
    assert fp32["frames"] == 2 * 4 and fp32["identical_frames"] == fp32["frames"]
    assert check["fp32_device_vs_cpu"]["greedy"]["identical_frames"] == 4
    assert check["bf16_vs_fp32"]["frames"] == 8 and check["bf16_engine_vs_synthesize"]["frames"] == 8
    assert sorted(r["engine_cost_main"]) == sorted(VARIANTS)
    assert list(r["engine_cost_big"]) == ["bfloat16-graphs"]
    for cost in [*r["engine_cost_main"].values(), *r["engine_cost_big"].values()]:
        assert cost["error"] is None and cost["stages"]["frames_measured"] >= 1
    levels = r["bench_main"]["levels"]
    assert [(lv["concurrency"], lv["utterances"], lv["failed"]) for lv in levels] == [(1, 1, 0), (2, 2, 0)]
    assert [(lv["concurrency"], lv["utterances"]) for lv in r["bench_big"]["levels"]] == [(1, 1)]
    assert r["compat"]["failures"] == 0 and r["compat"]["errors"] == 0
    md = (dry_run["out"] / "summary.md").read_text()
    for heading in (
        "## Stages",
        "## Correctness",
        "## Engine stage costs",
        "## Concurrency benchmark",
        "## Targets",
    ):
        assert heading in md


def test_a_stage_over_its_budget_is_stopped_with_what_it_started(tmp_path: Path) -> None:
    """The process group goes: a hung stage cannot hold its children (a server) running."""
    pid_file = tmp_path / "child.pid"
    proc = gpu_run.spawn(
        ["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], tmp_path / "stage.log", dict(os.environ)
    )
    for _ in range(200):
        if pid_file.is_file() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    child = int(pid_file.read_text())
    status, rc = gpu_run.wait_for(proc, 0.5)
    assert (status, rc) == ("timeout", None)
    assert proc.poll() is not None
    for _ in range(100):  # reaped by init once killed
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the stage's child outlived its stage")
    assert (tmp_path / "stage.log").read_text().startswith("$ bash -c")


def test_out_dir_limits_are_enforced(tmp_path: Path) -> None:
    for i in range(gpu_run.OUT_MAX_FILES):
        (tmp_path / f"f{i}").write_text("x")
    gpu_run.check_out_dir(tmp_path)
    (tmp_path / "one-too-many").write_text("x")
    with pytest.raises(SystemExit, match="more than the 8"):
        gpu_run.check_out_dir(tmp_path)


def test_clip_keeps_head_and_tail() -> None:
    data = b"".join(b"line %05d\n" % i for i in range(10_000))
    got = gpu_run.clip(data, 4096)
    assert len(got) == 4096 and got.startswith(b"line 00000") and got.endswith(b"line 09999\n")
    assert gpu_run.clip(b"short", 4096) == b"short"


def test_unknown_stage_is_refused_before_anything_runs(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "benchmarks.gpu_run", "--device", "cpu", "--preset", "tiny"]
    argv += ["--stages", "bench,nope", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "unknown stage(s) nope" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_wheel_list_pins_one_version_of_each() -> None:
    text = (ROOT / "benchmarks" / "fetch_gpu_wheels.sh").read_text()
    block = text[text.index("WHEELS=(") : text.index(")", text.index("WHEELS=("))]
    pins = re.findall(r"^\s+([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9.]*)$", block, re.M)
    names = [n.lower().replace("_", "-") for n, _ in pins]
    assert len(pins) == len(block.strip().splitlines()) - 1  # every line is an exact pin
    assert len(set(names)) == len(names)
    # what the GPU machine lacks (issue 16) and what the stages import from it
    assert {"av", "grpcio-tools", "grpcio-health-checking", "grpcio-reflection", "nvidia-riva-client"} <= set(
        names
    )
