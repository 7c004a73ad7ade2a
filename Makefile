# Thin front doors: every target is one line. `make train` and `make test` set themselves up.
VENV ?= .venv
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# DeepSpeed's JIT-compiled CPU ops (tests/test_multiprocess.py): built once per machine, outside any clone
export TORCH_EXTENSIONS_DIR ?= /var/tmp/selfalign-torch-extensions
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml scripts/setup.sh | cksum | cut -d' ' -f1)
LINT_PATHS := selfalign stages tests bench scripts
PORT ?= 8000
MODEL ?= $(firstword $(wildcard models/export) models/base)

.PHONY: setup train test test-fast lint format serve bench dag
setup: $(STAMP)
$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV) && touch $@
train: setup ; dvc repro
test: setup ; python -m pytest -q tests
test-fast: setup ; python -m pytest -q -m "not slow" tests
lint: setup ; ruff check $(LINT_PATHS) && ruff format --check $(LINT_PATHS)
format: setup ; ruff check --fix $(LINT_PATHS) && ruff format $(LINT_PATHS)
serve: setup ; python -m selfalign.serve --model $(MODEL) --port $(PORT)
bench: setup ; for b in bench/[!_]*.py; do python $$b || exit 1; done
dag: setup ; dvc dag

# Containers, the remote cache and profiles (docker/README.md). ENGINE is podman or docker, whichever is present.
.PHONY: image image-test train-docker push pull profile
ENGINE ?= $(firstword $(notdir $(shell command -v podman docker 2>/dev/null)))
IMAGE ?= selfalign:latest
CA_BUNDLE ?= /etc/ssl/certs/ca-certificates.crt
PROFILE ?= qwen2.5-7b-qlora
IMAGE_ARGS = $(if $(filter podman,$(ENGINE)),--format docker) $(if $(wildcard $(CA_BUNDLE)),--secret id=ca$(comma)src=$(CA_BUNDLE)) $(if $(filter-out 0,$(shell id -u)),--build-arg UID=$(shell id -u))
GPU_ARGS = $(if $(filter podman,$(ENGINE)),--device nvidia.com/gpu=all,--gpus all) --shm-size 16g
comma := ,
image: ; $(ENGINE) build -f docker/Dockerfile $(IMAGE_ARGS) -t $(IMAGE) .
image-test: ; bash scripts/image-test.sh
train-docker: ; $(ENGINE) run --rm $(GPU_ARGS) -v $(CURDIR):/workspace -v selfalign-hf-cache:/home/selfalign/.cache/huggingface $(IMAGE) dvc repro
push: setup ; python scripts/check-remote.py && dvc push --run-cache
pull: setup ; python scripts/check-remote.py && dvc pull --run-cache --allow-missing
profile: setup ; python -m selfalign.profile apply profiles/$(PROFILE).yaml
