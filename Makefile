# Two entry points: `make demo` (set up, then generate an image) and `make test` (set up, then run the tests).
PYTHON ?= python3
VENV ?= .venv
# torch==2.13.0 is the default build on PyPI (CUDA on Linux x86-64); override e.g. TORCH="torch>=2.4" to taste.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
MODEL ?= weights/Z-Image-Turbo
TINY := weights/tiny-random
PROMPT ?= A red fox in a snowy birch forest at dawn, soft light, detailed fur

.PHONY: setup setup-test demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

# Real weights when they are in $(MODEL); otherwise a tiny random checkpoint, so the whole path still runs.
demo: setup
	@if [ -f "$(MODEL)/model_index.json" ]; then \
		$(BIN)/zimage generate --model-path "$(MODEL)" --prompt "$(PROMPT)" --output z_image_output.png --overwrite; \
	else \
		echo "no weights in $(MODEL): generating with a tiny random checkpoint (noise-like picture)"; \
		{ [ -f $(TINY)/model_index.json ] || $(BIN)/zimage make-tiny $(TINY); } && \
		$(BIN)/zimage generate --model-path $(TINY) --prompt "$(PROMPT)" --width 256 --height 256 --seed 42 \
			--output z_image_output.png --overwrite; \
	fi

test: setup-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(TINY)
