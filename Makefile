# make demo: venv + install + default model + a short real fine-tune, before/after.
# make test: the whole test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.installed-base
DEV := $(VENV)/.installed-dev

.PHONY: demo test browser lint soak bench clean

# torch first, pinned to the CPU wheel on this machine's disk, so nothing pulls a CUDA build.
$(BASE): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	touch $(BASE)

# Test tools, the web UI and the openai client, on top of the base install.
$(DEV): $(BASE)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(DEV)

demo: $(BASE)
	$(BIN)/python examples/demo.py

# The web UI test drives Debian's chromium (never a browser download); installed once, as root or via sudo.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends \
			chromium chromium-driver fonts-liberation; \
	fi

test: $(DEV) browser
	$(BIN)/tunesmith env --provision >/dev/null
	$(BIN)/python -m pytest -q

lint: $(DEV)
	$(BIN)/ruff check src tests examples bench

soak: $(DEV)
	$(BIN)/python -m pytest -q -m soak

clean:
	rm -rf $(VENV) .pytest_cache
