# Thin front doors: every target is one line. `make train` and `make test` set themselves up.
VENV ?= .venv
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PORT ?= 8000
MODEL ?= $(firstword $(wildcard models/export) models/base)

.PHONY: setup train test lint serve bench dag
setup: $(STAMP)
$(STAMP): pyproject.toml
	bash scripts/setup.sh $(VENV) && touch $@
train: setup ; dvc repro
test: setup ; python -m pytest -q tests
lint: setup ; ruff check selfalign stages tests bench
serve: setup ; python -m selfalign.serve --model $(MODEL) --port $(PORT)
bench: setup ; for b in bench/*.py; do python $$b || exit 1; done
dag: setup ; dvc dag
