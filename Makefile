# One place for the commands the README gives. Everything installs into ./.venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data

.PHONY: install test lint flowers

$(BIN)/piggyback: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/piggyback

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
