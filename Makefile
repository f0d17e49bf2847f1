PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
VPIP := $(VENV)/bin/pip
PIP_FLAGS := --disable-pip-version-check -q

.PHONY: venv test demo bench bench-train bench-schedules bench-average bench-trackers gpu-check clean

venv: $(VENV)/.deps-stamp

$(VPY):
	$(PYTHON) -m venv $(VENV)

# torch/torchvision first, pinned, so the editable install below does not pull a different build.
$(VENV)/.torch-stamp: | $(VPY)
	$(VPIP) install $(PIP_FLAGS) torch==2.14.1 torchvision==0.29.1
	touch $@

$(VENV)/.deps-stamp: pyproject.toml $(VENV)/.torch-stamp
	$(VPIP) install $(PIP_FLAGS) -e '.[test,demo,data,log]'
	touch $@

# Two processes (the cores of the machine the suite is sized for), each taking whole test files,
# so a file's module fixtures are built once; TEST_WORKERS=0 runs it in this process alone.
TEST_WORKERS ?= 2
test: venv
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

demo: venv
	$(VPY) -m ematrain.cli.demo

bench: venv
	$(VPY) benchmarks/bench_ema.py

# EMA schedules, BatchNorm policies and switch-EMA on noisy-label digits (~4 min on 2 cores).
bench-schedules: venv
	$(VPY) benchmarks/bench_schedules.py

# export --average-best K against post-hoc EMA and the run's EMA on noisy digits (~30 min on 2 cores).
bench-average: venv
	$(VPY) benchmarks/bench_average.py

# What --log-tensorboard and --log-wandb (offline) cost a small run (~1.5 min on 2 cores).
bench-trackers: venv
	$(VPY) benchmarks/bench_trackers.py

# Whole runs against timm's train.py (TIMM_TRAIN: its path; it is not in timm's pip package).
bench-train: venv
	$(VPY) benchmarks/bench_train.py $(if $(TIMM_TRAIN),--timm-train $(TIMM_TRAIN),--skip-timm)

# On a machine with a CUDA GPU: CUDA tests, no-sync check, 224 px runs, CUDA EMA bench (~5 min).
gpu-check: venv
	$(VPY) benchmarks/gpu_check.py

clean:
	rm -rf output data
