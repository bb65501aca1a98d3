# verl-opd: two commands do all set-up on a fresh machine.
#   make demo   install, then a laptop-scale OPD run on CPU that visibly works
#   make test   install, then the test suite (CPU only)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU machine needs no CUDA wheels; override e.g. TORCH_SPEC="torch==2.11.0" on a GPU box.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.verl-opd-installed

.PHONY: install demo test test-demo lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (verl does not name it), and never replace a torch that is already there.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "using installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		$(PY) -m pip install -q "$(TORCH_SPEC)"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -c "import verl, verl_opd.glue.plugin as p; assert p.LOAD_ERROR is None; print('verl', verl.__version__, '+ verl-opd plugin OK')"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/verl-opd demo

# The whole suite, the short demo included (it builds the demo models into .cache/ once: ~1.5 min on 2 cores).
# Two pytest workers, one test file each at a time: an end-to-end run spends much of its time starting Ray
# and verl's workers, so two of them share 2 cores well (each run starts its own Ray instance on free ports).
test: install
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=15 -n 2 --dist loadfile

# The short demo alone (the CI test of `make demo`).
test-demo: install
	$(PY) -m pytest tests/test_demo.py -q -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples verify_opd_implementation.py
	$(VENV)/bin/ruff format --check src tests benchmarks examples verify_opd_implementation.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
