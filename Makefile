# `make bench` and `make test` each do all set-up on a fresh machine: a virtual environment,
# torch and the build tools, then the extension built in place with --no-build-isolation.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch>=2.4
CSRC := $(shell find csrc -type f)

.PHONY: all test bench build wheel clean

all: test

# The extras of pyproject.toml that the tests need (test: oracles and peers, scipy, trl, transformers;
# cache: safetensors, tqdm) are installed against a constraint that pins the torch just installed:
# otherwise a peer's `torch>=2` can pull a newer torch built for another CUDA than the nvcc the
# extension compiles with.
TEST_EXTRAS ?= test cache
$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" ninja setuptools wheel
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt $$($(PY) -c "import tomllib; \
		extras = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']; \
		print(' '.join(sorted({r for name in '$(TEST_EXTRAS)'.split() for r in extras[name]})))")
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(CSRC)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

# After the whole suite (whose emulated CUDA tests run every call under the forward and a random
# schedule), the emulated tests once more in the build whose kernels contract a*b + c into fused
# multiply-adds as nvcc's do, under two other schedules, and the mutation check's CI subset.
# The last runs serve the same values, edges and gradients from the portable (non-AVX2) kernels,
# which ATen's capability switch selects (not torch.compile: inductor's own C++ build fails under it).
test: build
	$(PY) -m pytest -q tests
	SIMT_FMA=1 SIMT_SCHEDULES=reverse,random:2 $(PY) -m pytest -q tests/test_simt_emulator.py tests/test_cuda_emulated*.py
	$(PY) tests/simt/mutation_check.py --ci
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q tests/test_values.py tests/test_edges.py tests/test_gradients.py \
		tests/test_sparse_values.py tests/test_logit_range.py
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q tests/test_jsd.py -k "not compile"
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q tests/test_distill.py tests/test_distill_linear.py -k "not compile and not liger"

bench: build
	$(PY) -m kl_fused.bench

wheel: $(VENV)/.deps
	$(PY) -m pip wheel --no-build-isolation --no-deps -w wheelhouse .

clean:
	rm -rf build dist wheelhouse *.egg-info kl_fused/_C*.so $(VENV)/.built
