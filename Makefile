# `make test` works on a fresh machine: it creates .venv if missing, installs the package with the
# dev, diffusers, train, eval and video extras (and DeepSpeed), then runs ruff and pytest (unit tests + doctests + README snippets).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch 2.14.1 / torchvision 0.29.1 are the matching pair available on this machine's disk; lpips needs a
# torchvision built for the installed torch.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_WORKERS ?= 2
DEEPSPEED_PIN ?= deepspeed==0.19.8

.PHONY: install test lint typecheck bench clean demo demo-flow demo-one-step gpu-wheels

# No pip cache: CI machines have had little free disk (one install died of "No space left on device"), and the
# venv alone is ~6 GB (torch's CUDA build); a cache would hold a second copy of every downloaded wheel.
$(VENV)/.installed: export PIP_NO_CACHE_DIR = 1
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PINS)
	$(PIP) install --quiet -e ".[dev,diffusers,train,eval,video]" $(TORCH_PINS)
	# DeepSpeed for tests/examples/test_deepspeed.py: an sdist whose setup imports torch, so it builds
	# against the installed torch (no build isolation); its ops compile just in time, none are needed on CPU.
	$(PIP) install --quiet --no-build-isolation $(DEEPSPEED_PIN)
	touch $@

install: $(VENV)/.installed

# pydoclint: every public function, method and class of the package documents its parameters and results
# (config in pyproject.toml; tests/test_docstrings.py checks the Raises sections).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pydoclint --quiet .

# mypy needs a folder named like the package: link the repository root into build/typecheck/diffdistill.
typecheck: install
	mkdir -p build/typecheck && ln -sfn "$(CURDIR)" build/typecheck/diffdistill
	MYPYPATH=build/typecheck $(VENV)/bin/mypy -p diffdistill --exclude '/(tests|benchmarks|examples|build)/'

test: install lint typecheck
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) -q tests

# The README's main command: distill the shipped toy teacher into 1/2/4-step students on the CPU (< 10 min on
# 2 cores); prints a table and writes build/toy_demo/grid.png and results.md (see examples/toy/README.md).
demo: install
	$(PY) examples/toy/distill.py --threads 2 --out build/toy_demo

# The same demo on the shipped rectified-flow teacher (examples/toy/README.md, "Flow-matching teacher").
demo-flow: install
	$(PY) examples/toy/distill.py --teacher flow --threads 2 --out build/toy_demo_flow

# The one-step proof on the VP teacher: every one-step generator the toy trains (SIM, DMD, DMD2's 1-step recipe,
# adversarial, regression) against the teacher (examples/toy/README.md, "One-step generators").
demo-one-step: install
	$(PY) examples/toy/distill.py --methods sim dmd dmd2-1step adversarial regression --sim-one-step \
		--pair-one-step --threads 2 --out build/toy_demo_one_step

# Wheels the GPU machine's image lacks (Python 3.12, x86-64), for benchmarks/gpu_checks.sh: the device tool
# carries .whl/ (git-ignored) and the script installs it there.
GPU_WHEELS ?= diffusers==0.42.1 lpips==0.1.4 elatentlpips==0.2 setuptools==80.10.2
gpu-wheels: install
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
