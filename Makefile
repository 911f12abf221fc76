# make run   set everything up, then run the daemon on the built-in demo model
# make test  set everything up, then run the tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch kept on disk; a loose requirement would pull a
# multi-GB CUDA build.
TORCH  ?= torch==2.13.0+cpu
STAMP  := $(VENV)/.moed-installed

.PHONY: run test setup build clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard cython_src/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install "setuptools>=68" wheel "Cython>=3.0"
	MOED_BUILD_JOBS=2 $(PY) -m pip install --no-build-isolation -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m moed.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf build *.egg-info moed/*.so $(VENV)
