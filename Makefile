# Set-up and entry points. Every target creates or reuses the virtual environment in .venv/.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast bench build clean

venv: $(STAMP)

# Reinstalls when the dependency list changes; torch/torchvision are pinned (pip takes them from local disk).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	-$(BIN)/python -m cuda_ext.build
	touch $@

# The main job on its embedded default: sample photographs -> local Ray -> ./demo_output/features.zarr
demo: venv
	$(BIN)/python jobs/upsample_coco.py

# Two pytest workers, one test file each at a time (a file's Ray cluster or S3 server stays in one process):
# most end-to-end tests wait on Ray and S3 rather than compute.
test: venv
	$(BIN)/python -m pytest -n 2 --dist loadfile

# Skips the slow end-to-end tests (Ray clusters, training runs).
test-fast: venv
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not slow"

build: venv
	$(BIN)/python -m cuda_ext.build

bench: venv
	$(BIN)/python benchmarks/bench_adaptive_conv.py

clean:
	rm -rf demo_output .pytest_cache
