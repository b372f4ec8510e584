# The two commands of the README. Each installs what it needs first (scripts/install.sh), so they
# work on a machine with nothing but python3.
VENV ?= .venv

.PHONY: demo test lint install bench clean

$(VENV)/.installed-%: pyproject.toml scripts/install.sh
	scripts/install.sh $*
	touch $@

install: $(VENV)/.installed-test

demo: $(VENV)/.installed-test
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/python -m flows.pipeline configs/demo.yaml

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check medgen flows tests benchmarks
	$(VENV)/bin/ruff format --check medgen flows tests benchmarks
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/python -m pytest -q

bench: $(VENV)/.installed-test
	$(VENV)/bin/python benchmarks/ingest.py
	$(VENV)/bin/python benchmarks/train_ldm.py
	$(VENV)/bin/python benchmarks/metrics_validity.py
	$(VENV)/bin/python benchmarks/pipeline.py

clean:
	rm -rf demo_run .pytest_cache
