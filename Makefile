# Two commands from a fresh clone:  `make demo` (the main job on the embedded digits data) and `make test`.
# Both create or reuse the virtualenv $(VENV) and install what they need into it.
VENV ?= .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
# tested torch pins per machine type (any torch>=2.2 works; on a GPU machine install the CUDA build you need first)
TORCH_x86_64 := torch==2.14.1 torchvision==0.29.1
TORCH_aarch64 := torch==2.9.1 torchvision==0.24.1
TORCH := $(or $(TORCH_$(ARCH)),torch torchvision)

.PHONY: install demo test test-avx2 test-all bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/symstitch sweep --config experiments/zoo_digits.yaml experiments/stitch_digits.yaml \
	    experiments/align_digits.yaml
	$(VENV)/bin/symstitch report runs/digits

# OpenMP's default wait policy: the tests run one torch process at a time (their subprocesses take one thread
# each), and PASSIVE made the suite 20 % slower (4:47 against 3:53 on the 2-core AVX-512 machine)
test: install
	$(PY) -m pytest -q

# the ground-truth tests again on the numeric path of an AVX2 machine (torch's kernels, oneDNN convolutions, MKL GEMMs):
# they must hold on any CPU by construction, not by a bound tuned on one machine
AVX2 := ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-avx2: install
	$(AVX2) $(PY) -m pytest -q -m "groundtruth and not slow"

test-all: install
	$(PY) -m pytest -q -m ""

bench: install
	$(PY) experiments/benchmarks/data.py
	$(PY) experiments/benchmarks/stitch_step.py
	$(PY) experiments/benchmarks/metrics.py
	$(PY) experiments/benchmarks/cell_overhead.py --compare 6d5f7c2

clean:
	rm -rf runs lightning_logs .pytest_cache
