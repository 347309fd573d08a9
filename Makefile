# Every command the README shows is a target here. Each installs what it needs.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# CPU build by default; GPU users: make TORCH_SPEC="torch==2.x.y" (with their index) ...
TORCH_SPEC ?= torch==2.13.0
MODEL ?= Qwen/Qwen3-TTS-12Hz-0.6B-Base
TINY := checkpoints/tiny-base
SERVE_ARGS ?=

.PHONY: venv proto system-deps run serve demo agent test test-slow lint fmt reference checkpoints clean

GEN := qwen3tts_rt/v1/tts_pb2.py

$(BIN)/.installed: pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	@$(PY) -c "import venv, ensurepip" 2>/dev/null || { apt-get update && apt-get install -y python3-venv; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,webrtc,pipecat,livekit,ray]"
	touch $@

# Generated gRPC stubs (never edited, not committed): qwen3tts_rt/v1/*_pb2*.py
$(GEN): proto/qwen3tts_rt/v1/tts.proto $(BIN)/.installed
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $<

proto: $(GEN)

venv: $(BIN)/.installed $(GEN)

# Serve the real default model (hub cache, or downloaded with progress). Offline without
# cached weights it says so and how to proceed.
run: venv
	$(BIN)/qwen3tts-rt serve --model $(MODEL) $(SERVE_ARGS)

# Serve any checkpoint: make serve MODEL=checkpoints/tiny-base SERVE_ARGS="--port 50052"
serve: venv
	$(BIN)/qwen3tts-rt serve --model $(MODEL) $(SERVE_ARGS)

$(TINY)/config.json: | venv
	$(BIN)/qwen3tts-rt make-checkpoint --preset tiny --kind base --out $(TINY)

# The whole path offline on a tiny random checkpoint: server, voice, `say` token by token,
# a WAV in out/demo.wav and the latency summary.
demo: venv $(TINY)/config.json
	$(BIN)/python -m qwen3tts_rt.server.demo --checkpoint $(TINY) --out out/demo.wav

# The WebRTC voice agent (page on http://127.0.0.1:8080) in front of a running TTS server:
# make agent AGENT_ARGS="--tts 127.0.0.1:50051 --speaker vivian --llm-url http://127.0.0.1:11434/v1"
AGENT_ARGS ?=
agent: venv
	$(BIN)/qwen3tts-agent $(AGENT_ARGS)

# Debian packages the agent tests need: espeak-ng (spoken input) and chromium (a real WebRTC
# peer, driven by playwright; no browser is downloaded). Installed only when missing.
AGENT_BINS := espeak-ng chromium
# redis-server: the Redis voice store and Ray Serve tests start their own on a free loopback port
TEST_BINS := $(AGENT_BINS) redis-server
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

system-deps:
	@missing=""; for b in $(TEST_BINS); do command -v $$b >/dev/null || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (apt)"; \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y $$missing; } \
			|| echo "could not install$$missing: the tests that need them will be skipped"; \
	fi

test: venv system-deps
	$(BIN)/python -m pytest

test-slow: venv
	$(BIN)/python -m pytest -m slow

lint: venv
	$(BIN)/ruff check qwen3tts_rt agent tests benchmarks
	$(BIN)/ruff format --check qwen3tts_rt agent tests benchmarks
	$(BIN)/mypy qwen3tts_rt agent

fmt: venv
	$(BIN)/ruff check --fix qwen3tts_rt agent tests benchmarks
	$(BIN)/ruff format qwen3tts_rt agent tests benchmarks

# Regenerate tests/reference/data/*: runs the official qwen-tts package in its own venv.
reference: venv
	bash tests/reference/run_reference.sh

clean:
	rm -rf $(VENV) .venv-ref checkpoints out

# --- benchmarks (issue 6)
# The concurrency benchmark: the real server, N LLM-like gRPC streams, side by side with the
# official qwen-tts package and the peers' decode; writes benchmarks/results/<device>-<preset>-<date>/.
# make bench BENCH_ARGS="--preset 0.6b --device cuda --dtype bfloat16"   (see benchmarks/README.md)
BENCH_ARGS ?= --preset 0.6b
.PHONY: bench bench-smoke

bench: venv
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

bench-smoke: venv
	$(BIN)/python -m benchmarks --preset tiny

# --- reliability (issue 8)
# Runs the reliability tests, soak included (tens of minutes on 2 cores), and regenerates
# docs/RELIABILITY.md from the figures they record.
.PHONY: reliability
reliability: venv
	$(BIN)/python -m tests.reliability_report

# --- scale-out (issue 15): the service as a Ray Serve application (docs/DEPLOY.md)
# Starts a local Ray cluster and the application; clients use the proxy's gRPC port (9000) with
# metadata "application: qwen3tts". Settings are name=value (RayAppConfig, ServerConfig, EngineConfig):
# make ray-serve MODEL=checkpoints/tiny-base RAY_ARGS="num_gpus=0 num_cpus=1 num_replicas=2 voices_url=redis://127.0.0.1:6379/0"
# On a GPU cluster: serve run deploy/ray_serve.yaml (or KubeRay, docs/DEPLOY.md).
RAY_ARGS ?= num_gpus=0 num_cpus=1 num_replicas=1
RAY_BENCH_ARGS ?= --preset tiny --direct-ingress
.PHONY: ray-serve ray-bench
ray-serve: venv
	$(BIN)/python -m qwen3tts_rt.server.ray_app model=$(MODEL) $(RAY_ARGS)

# First packet and inter-packet gaps through the Ray proxy vs the direct server (concurrency 1 and 8);
# writes benchmarks/results/ray-<device>-<preset>-<date>/.
ray-bench: venv
	$(BIN)/python -m benchmarks.ray_bench $(RAY_BENCH_ARGS)

# --- GPU readiness (issue 16): one run on the lent GPU machine (benchmarks/gpu_recipe.md)
# gpu-wheels: the wheels that machine lacks, into .gpu-wheels/ (ignored; the device call carries it).
# gpu-dry-run: the same script, stages and outputs on a CPU with the tiny preset (also in make test).
.PHONY: gpu-wheels gpu-dry-run
gpu-wheels: venv
	bash benchmarks/fetch_gpu_wheels.sh

gpu-dry-run: venv
	bash benchmarks/gpu_run.sh --device cpu --preset tiny --work out/gpu-dry-run/work --out out/gpu-dry-run/out
