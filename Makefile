# Set-up and the two everyday jobs. `make demo` and `make test` each create the virtual
# environment on first use (pinned torch, the package with its compiled kernels, dev tools).
PYTHON ?= python3
VENV ?= .venv
# The pins these machines use; the package itself accepts a range (pyproject.toml).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
CUDA_HOME ?= $(shell for d in "$$CUDA_HOME" /usr/local/cuda; do [ -n "$$d" ] && ls "$$d"/lib64/libcudart.so* >/dev/null 2>&1 && echo "$$d" && break; done)
export CUDA_HOME

BIN := $(VENV)/bin
STAMP := $(VENV)/.lesionkit-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade setuptools wheel
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -v --no-build-isolation -e ".[dev,triton]" > $(VENV)/install.log 2>&1 \
		|| { tail -n 60 $(VENV)/install.log; exit 1; }
	@grep -A8 "lesionkit build configuration" $(VENV)/install.log || true
	touch $@

demo: $(STAMP)
	$(BIN)/lesionkit demo --out demo_out

# The fast stage: every test not marked slow, one torch thread each (tests/conftest.py), in
# TEST_WORKERS processes (pytest-xdist; 2 = this project's 2-core machines, 0 = in-process).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --durations=25

# The slow stage: builds (wheel, CMake, other CPU targets), ONNX Runtime checks, DDP, kill / resume, the GPU-check dry
# run, the wiring breakages - single-threaded tests, two at a time (pytest-xdist; test by test, except the files whose
# tests share a module fixture, which carry an xdist_group); then the kernel
# tests again at two threads, so that the parallel paths stay tested.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -n 2 --dist loadgroup --durations=25
	LESIONKIT_TEST_THREADS=2 $(BIN)/python -m pytest -q -m "not slow" -k "not triton" \
		tests/test_selective_scan.py tests/test_cross_scan.py tests/test_kmeans.py \
		tests/test_patch_cross_attention.py tests/test_patchwise_softmax_loss.py

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q --benchmark-json benchmarks/results/latest.json

clean:
	rm -rf build $(VENV) lesionkit/_C*.so *.egg-info
