# The two README commands. Each does its own set-up on a fresh machine:
# a virtualenv, the CPU torch wheel first when there is no CUDA GPU, the project, the offline assets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0

.PHONY: demo test test-fast setup assets lint clean browser soak

# headless Chromium + chromedriver for the report's browser test (Debian/Ubuntu; needs root or sudo)
browser:
	@if ! command -v chromedriver >/dev/null 2>&1; then \
		if command -v apt-get >/dev/null 2>&1; then \
			SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
			($$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q \
				--no-install-recommends chromium chromium-driver) \
			|| echo "could not install chromium: the browser test skips (and fails under CI=true)"; \
		else echo "no apt-get: install Chromium and chromedriver yourself, or the browser test skips"; fi; \
	fi

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if ! nvidia-smi -L >/dev/null 2>&1; then $(BIN)/pip install $(TORCH_CPU); fi
	$(BIN)/pip install -e '.[test,compress]'
	touch $@

setup: $(BIN)/.installed

assets: setup
	$(BIN)/llmkit assets

# OMP_NUM_THREADS and DS_ACCELERATOR are what torchrun and DeepSpeed settle on for this CPU-only config (gpu_ids: "");
# set here, the launcher prints no notice about either (llmkit sets torch's threads per rank itself)
demo: assets
	OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu $(BIN)/accelerate launch --config_file accelerate_configs/cpu_zero2.yaml \
		recipes/classification.py --config recipes/configs/sentiment_minilm_polarity.yaml \
		--output.overwrite_output_dir true
	@echo "demo done: the evaluation report is outputs/sentiment_minilm_polarity/report.html"

test: assets browser
	$(BIN)/python -m pytest -v --durations=25 tests

# the edit loop: every test that starts no process and loads no real asset (a few minutes)
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" --durations=10 tests

# not part of `make test`: ~2,000 steps of a 2-rank ZeRO-3 run, watched for memory, fd and disk growth
soak: setup
	$(BIN)/python bench/soak.py

lint: setup
	$(BIN)/ruff check llmkit recipes tests

clean:
	rm -rf $(VENV) outputs .pytest_cache
