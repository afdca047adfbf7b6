# Two commands on a fresh machine:  `make demo` (set up + run the default job)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-slow

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/distsparse train --output_dir outputs/demo --overwrite_output_dir

test: setup
	bash scripts/start_slurm.sh || echo "slurm not started: the slurm tests will skip"
	$(PY) -m pytest -q -ra

test-slow: setup
	DISTSPARSE_SLOW=1 $(PY) -m pytest -q -ra -m slow
