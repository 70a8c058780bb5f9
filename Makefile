# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv on first use: torch 2.13.0 (a CPU build that installs offline on our machines;
# on other machines pip fetches it), then this package with its dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test conformance lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	# Renders and caches the help of train and finetune (hf_moe_routers/cli/help_cache.py), so the
	# first `train --help` answers at once; a failure here must not fail the install.
	-HF_HUB_OFFLINE=1 $(PY) -m hf_moe_routers train --help > /dev/null
	-HF_HUB_OFFLINE=1 $(PY) -m hf_moe_routers finetune --help > /dev/null
	touch $(STAMP)

# OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads sleep instead of spinning while they wait, so a
# second busy process on the machine does not slow the job down several-fold (README, "A note on
# CPU threads"). The package sets the same default on import; here it is explicit and overridable.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m hf_moe_routers train --output_dir outputs/main_job

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

# transformers' own test mixins on every routed class x router type, with the unpatched families as
# controls (docs/CONFORMANCE.md); `make test` runs only the default subset of these.
conformance: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests/conformance --conformance-full

lint: $(STAMP)
	$(VENV)/bin/ruff check hf_moe_routers tests examples benchmarks
	$(VENV)/bin/ruff format --check hf_moe_routers tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
