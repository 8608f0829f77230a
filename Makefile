# stagcompile: `make demo` and `make test` each set up .venv (if missing) and run.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SC := $(VENV)/bin/stagcompile
STAMP := $(VENV)/.installed
# The CPU wheel of torch (an unpinned torch would pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0
EXTRAS ?= export,plugin,trt-rtx,test,plot
PYTEST_ARGS ?= -q

.PHONY: setup test demo clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	rm -rf out/demo-ckpt
	$(SC) init --preset tiny -o out/demo-ckpt --seed 0
	$(SC) inspect out/demo-ckpt
	$(PY) -m stagcompile.reference_demo out/demo-ckpt

clean:
	rm -rf out .pytest_cache
