# bbert: two commands do everything on a fresh machine (see README.md).
#   make book   create .venv, install, execute the notebooks at tiny scale, render _build/html
#   make test   create .venv, install, run every test (pytest, nbmake notebooks, the book build)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU torch wheel goes in first, so that nothing later pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install book test test-fast test-gpu notebooks bench clean prepare

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[training,deepspeed,book,test,search]"
	touch $(STAMP)

install: $(STAMP)

prepare: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/bbert prepare --out data/sample

book: $(STAMP)
	HF_HUB_OFFLINE=1 BBERT_SCALE=tiny $(VENV)/bin/jupyter-book build --all -W --keep-going .

test: $(STAMP)
	HF_HUB_OFFLINE=1 BBERT_SCALE=tiny $(PY) -m pytest -q tests
	HF_HUB_OFFLINE=1 BBERT_SCALE=tiny $(PY) -m pytest -q --nbmake --nbmake-timeout=900 notebooks

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not book" tests

# The CUDA paths, on a GPU machine: a .venv made with a CUDA torch (make install TORCH_PIN=torch),
# or GPU_PYTHON=python3 for an environment that already has torch with CUDA and bbert's dependencies.
GPU_PYTHON ?= $(PY)
test-gpu:
	$(GPU_PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
		'test-gpu: this torch ($(GPU_PYTHON)) sees no CUDA GPU; see the Makefile for GPU_PYTHON')"
	HF_HUB_OFFLINE=1 $(GPU_PYTHON) -m pytest -q -m gpu -rs tests/test_gpu.py

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf _build .pytest_cache
