# One place for the commands the README gives. Everything installs into ./.venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data

.PHONY: install test lint flowers browser

$(BIN)/piggyback: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/piggyback browser

# The page's browser test drives Debian's chromium through Playwright (Playwright's own browser
# download is not reachable from CI). Installed when missing and we may (root); else a hint.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		else echo "chromium is missing: the browser test will skip (apt-get install chromium)"; fi; }

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 -q

lint: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The main job: train a Flowers-102 task on the offline EfficientNet-Lite0 and print its test
# accuracy (the paper's recipe at 128 px; ~25 min on 2 CPU cores).
FLOWERS ?= $(DATA)/flowers102
flowers: install
	$(BIN)/piggyback train --data $(FLOWERS) --output models/efficientnet_lite0 \
		--task flowers102 --image-size 128 --epochs 30 $(ARGS)
