# Fresh-machine entry points (see README "Quick start").
# CPU installs pin torch through constraints/cpu.txt; without it pip pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.ftloop-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints/cpu.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ftloop demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) ftloop-demo ftloop-run
