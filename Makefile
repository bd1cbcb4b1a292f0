# The two README commands. Each does its own set-up on a fresh machine:
# a virtualenv, the CPU torch wheel first when there is no CUDA GPU, the project, the offline assets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0

.PHONY: demo test setup assets lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if ! nvidia-smi -L >/dev/null 2>&1; then $(BIN)/pip install $(TORCH_CPU); fi
	$(BIN)/pip install -e '.[test]'
	touch $@

setup: $(BIN)/.installed

assets: setup
	$(BIN)/llmkit assets

demo: assets
	$(BIN)/accelerate launch --config_file accelerate_configs/cpu_zero2.yaml \
		recipes/classification.py --config recipes/configs/sentiment_minilm_polarity.yaml \
		--output.overwrite_output_dir true

test: assets
	$(BIN)/python -m pytest -v --durations=15 tests

lint: setup
	$(BIN)/ruff check llmkit recipes tests

clean:
	rm -rf $(VENV) outputs .pytest_cache
