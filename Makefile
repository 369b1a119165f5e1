# Two user-facing targets (README Quick start): `make demo` and `make test`.
# Both create .venv/ on first use. TORCH picks the torch build: the default is the CPU wheel;
# on a GPU cluster use e.g. `make TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"`.
# DALI picks the DALI build (README "GPU clusters"): the CUDA 13 build needs an NVIDIA driver
# >= 580, so with an older driver (CUDA 12: 525-579) the CUDA 12 build is taken; without a GPU
# either runs (its CPU operators need no driver). Override with `make DALI=nvidia-dali-cuda120==2.4.0`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
DRIVER_MAJOR := $(shell nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null \
                  | head -n 1 | cut -d. -f1)
DALI_CUDA := $(if $(DRIVER_MAJOR),$(shell [ $(DRIVER_MAJOR) -ge 580 ] && echo cuda130 || echo cuda120),cuda130)
DALI ?= nvidia-dali-$(DALI_CUDA)==2.4.0
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test test-fast install clean

install: $(INSTALLED)

# torch goes first and explicitly: anything that depends on it would otherwise pull a CUDA build.
$(INSTALLED): setup.py requirements/base.txt requirements/nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements/base.txt
	$(PY) -m pip install -q $(DALI)
	$(PY) -m pip install -q --no-deps -r requirements/nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: $(INSTALLED)
	$(PY) -m cmaclip.demo

test: $(INSTALLED)
	$(PY) -m pytest -q

# Everything but the multi-process tests (marked slow): for a quick edit-test loop.
test-fast: $(INSTALLED)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo-out
