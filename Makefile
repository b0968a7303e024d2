# Fresh-machine entry points (see README "Quick start").
# CPU installs pin torch through constraints/cpu.txt; without it pip pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.ftloop-installed

.PHONY: demo test lint install clean mutation

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints/cpu.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ftloop demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# test: headless Chromium for tests/e2e/test_report_browser.py (CI runs as root on Debian; nothing to do when it is
# there, and no install attempt without root: the test then skips, saying why)
test: lint
	command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || (apt-get update -qq && apt-get install -y -qq chromium)
	$(VENV)/bin/python -m pytest

# Mutation testing over the modules listed in [tool.mutmut] (pyproject.toml); slow (see bench/README.md).
# mutmut runs in a staged copy laid out as the installed package (components/ -> ftloop/components/), so
# mutant names are the real module names. MUTANTS narrows the run, e.g.
#   make mutation MUTANTS='ftloop.components.evaluation.stats.*'
# Results stay in .mutation/mutants/ (`cd .mutation && ../.venv/bin/mutmut results`). Not build/: packaging tests remove it.
# MUTATION_TESTS replaces the test files of [tool.mutmut] for one run (mutmut has one list for all modules), e.g.
# config's KFP slicing helpers, which only the fast pipeline tests reach:
#   make mutation MUTANTS='ftloop.components.config.*' \
#     MUTATION_TESTS='tests/unit/test_config.py tests/pipeline/test_compile.py tests/pipeline/test_reproducibility.py'
MUTATION_DIR := .mutation
MUTANTS ?=
MUTATION_TESTS ?=
MUTATION_JOBS ?= 2

mutation: $(STAMP)
	rm -rf $(MUTATION_DIR)
	mkdir -p $(MUTATION_DIR)/ftloop
	cp ftloop/__init__.py $(MUTATION_DIR)/ftloop/
	cp -R components $(MUTATION_DIR)/ftloop/components
	cp -R pipelines $(MUTATION_DIR)/ftloop/pipelines
	cp -R tests data configs manifests pyproject.toml $(MUTATION_DIR)/
	find $(MUTATION_DIR) -name __pycache__ -prune -exec rm -rf {} +
	if [ -n "$(strip $(MUTATION_TESTS))" ]; then $(abspath $(VENV))/bin/python -c 'import re, sys; p = sys.argv[1]; \
	  s = re.sub(r"pytest_add_cli_args_test_selection = \[.*?\]", "pytest_add_cli_args_test_selection = %r" % sys.argv[2:], \
	  open(p).read(), flags=re.S); open(p, "w").write(s)' $(MUTATION_DIR)/pyproject.toml $(MUTATION_TESTS); fi
	cd $(MUTATION_DIR) && $(abspath $(VENV))/bin/mutmut run --max-children $(MUTATION_JOBS) $(MUTANTS)
	cd $(MUTATION_DIR) && $(abspath $(VENV))/bin/mutmut export-cicd-stats
	cd $(MUTATION_DIR) && $(abspath $(VENV))/bin/mutmut results

clean:
	rm -rf $(VENV) ftloop-demo ftloop-run
