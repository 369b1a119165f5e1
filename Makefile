# Two user-facing targets (README Quick start): `make demo` and `make test`.
# Both create .venv/ on first use. TORCH picks the torch build: the default is the CPU wheel;
# on a GPU cluster use e.g. `make TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
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
