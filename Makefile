# oncall-pager: `make run` and `make test` work on a fresh clone with only python3 and make.
# The virtualenv is built on demand and rebuilt when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
BIN    := $(VENV)/bin

.PHONY: all venv run test lint bench clean

all: test

venv: $(STAMP)

# The stamp is written only after a successful install, so a failed one is retried next time.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[test]'
	touch $@

var:
	mkdir -p $@

# The embedded default: file:var store, dry-run telephony, 127.0.0.1:8080. `serve` puts
# oncall_config.example.json into the store when it holds no operational config yet.
run: $(STAMP) | var
	$(BIN)/oncall-pager serve -c config.ini.example

# ruff runs quietly here (it prints only problems), so on success pytest's summary line
# stays the last line of the output, where CI looks for it.
test: $(STAMP)
	$(BIN)/python -m pytest
	@$(BIN)/ruff check --quiet .

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench_oncall_pager.py

clean:
	rm -rf $(VENV) var build dist *.egg-info __pycache__ .pytest_cache .ruff_cache .hypothesis
	rm -f oncall_config.cache.json
