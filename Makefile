# Every command the README shows is a target here. Each installs what it needs.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# CPU build by default; GPU users: make TORCH_SPEC="torch==2.x.y" (with their index) ...
TORCH_SPEC ?= torch==2.13.0
MODEL ?= Qwen/Qwen3-TTS-12Hz-0.6B-Base
TINY := checkpoints/tiny-base

.PHONY: venv proto run test test-slow lint fmt reference checkpoints clean

GEN := qwen3tts_rt/v1/tts_pb2.py

$(BIN)/.installed: pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	@$(PY) -c "import venv, ensurepip" 2>/dev/null || { apt-get update && apt-get install -y python3-venv; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# Generated gRPC stubs (never edited, not committed): qwen3tts_rt/v1/*_pb2*.py
$(GEN): proto/qwen3tts_rt/v1/tts.proto $(BIN)/.installed
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $<

proto: $(GEN)

venv: $(BIN)/.installed $(GEN)

run: venv
	$(BIN)/qwen3tts-rt synth --model $(MODEL) --text "Hello! This is Qwen3-TTS speaking in real time." \
		--language english --out out/hello.wav

test: venv
	$(BIN)/python -m pytest

test-slow: venv
	$(BIN)/python -m pytest -m slow

lint: venv
	$(BIN)/ruff check qwen3tts_rt agent tests benchmarks
	$(BIN)/ruff format --check qwen3tts_rt agent tests benchmarks
	$(BIN)/mypy qwen3tts_rt

fmt: venv
	$(BIN)/ruff check --fix qwen3tts_rt agent tests benchmarks
	$(BIN)/ruff format qwen3tts_rt agent tests benchmarks

# Regenerate tests/reference/data/*: runs the official qwen-tts package in its own venv.
reference: venv
	bash tests/reference/run_reference.sh

clean:
	rm -rf $(VENV) .venv-ref checkpoints out
