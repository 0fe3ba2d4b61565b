# wantrain -- the two commands of the README:
#   make demo   set up .venv (CPU torch unless a GPU is present) and run the CPU demo
#   make demo-i2v   the same for an image-to-video (I2V-A14B) LoRA
#   make test   same set-up, then the whole test suite
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.wantrain-installed
DEMO    := demo

.PHONY: setup demo demo-i2v test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install_torch.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	bash scripts/install_torch.sh $(PY)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	test -f $(DEMO)/model/model_index.json || $(VENV)/bin/wantrain make-tiny-model $(DEMO)/model
	test -d $(DEMO)/data || $(VENV)/bin/wantrain make-demo-data $(DEMO)/data
	$(VENV)/bin/wantrain run profiles/demo_cpu.toml

demo-i2v: setup
	test -f $(DEMO)/model_i2v/model_index.json || $(VENV)/bin/wantrain make-tiny-model $(DEMO)/model_i2v --arch wan22_i2v_a14b
	test -d $(DEMO)/data || $(VENV)/bin/wantrain make-demo-data $(DEMO)/data
	$(VENV)/bin/wantrain run profiles/demo_i2v_cpu.toml

test: setup
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/kernel_overhead.py

clean:
	rm -rf $(DEMO) output .pytest_cache
