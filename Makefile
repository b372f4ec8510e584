# The two commands of the README. Each installs what it needs first (scripts/install.sh), so they
# work on a machine with nothing but python3.
VENV ?= .venv
DEMO_DIR ?= demo_run

.PHONY: demo test install bench clean

$(VENV)/.installed-%: pyproject.toml scripts/install.sh
	scripts/install.sh $*
	touch $@

install: $(VENV)/.installed-test

demo: $(VENV)/.installed-test
	$(VENV)/bin/medgen demo --out $(DEMO_DIR)

test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest -q

bench: $(VENV)/.installed-test
	$(VENV)/bin/python benchmarks/ingest.py
	$(VENV)/bin/python benchmarks/train_ldm.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
