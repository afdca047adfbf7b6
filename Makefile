# Two commands on a fresh machine:  `make demo` (set up + run the default job)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, so the package's torch range is already met and pip keeps it. The
# version below is the CPU build on this project's machines (their pip finds it locally); elsewhere
# add TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build, or TORCH= to keep pip's choice.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# pytest-xdist workers; a file's tests stay on one worker (module fixtures, the one Slurm cluster).
# Each multi-rank test starts its own processes, so more workers than cores only queue them.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup demo test test-slow wheel-check

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q '$(TORCH)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)))
	$(PY) -m pip install -q -e '.[all,test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/distsparse train --output_dir outputs/demo --overwrite_output_dir

test: setup
	bash scripts/start_slurm.sh || echo "slurm not started: the slurm tests will skip"
	$(PYTEST)

test-slow: setup
	DISTSPARSE_SLOW=1 $(PYTEST) -m slow

# The built wheel, installed with [all] into a fresh venv, runs from outside the repository.
wheel-check:
	PYTHON=$(PYTHON) TORCH='$(TORCH)' TORCH_INDEX='$(TORCH_INDEX)' bash .ci/wheel_check
