# stagcompile: `make demo` and `make test` each set up .venv (if missing) and run.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SC := $(VENV)/bin/stagcompile
STAMP := $(VENV)/.installed
# The CPU wheel of torch (an unpinned torch would pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0
EXTRAS ?= export,plugin,trt-rtx,test,plot,peer,serve,triton
PYTEST_ARGS ?= -q -n 2 --dist loadgroup

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

PROMPT ?= To be, or not to be, that is the question:
TOKENS ?= 64

demo: setup
	$(SC) inspect stagcompile/demo
	$(SC) compile stagcompile/demo -o out/demo-bundle --force
	$(PY) out/demo-bundle/runtime/run.py --prompt "$(PROMPT)" --max-new-tokens $(TOKENS) \
	    --temperature 0.8 --top-p 0.95 --seed 0

clean:
	rm -rf out .pytest_cache
