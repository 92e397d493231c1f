# oncall-pager: `make run` and `make test` work on a fresh clone with only python3 and make.
# The virtualenv is built on demand and rebuilt when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
BIN    := $(VENV)/bin

.PHONY: all venv run test lint bench lock clean

all: test

venv: $(STAMP)

# The stamps are written only after a successful install, so a failed one is retried next
# time. `make run` needs only what serve needs; the test extras come with `make test`.
$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e .
	touch $@

$(STAMP): $(RUN_STAMP)
	$(BIN)/pip install -e '.[test]'
	touch $@

var:
	mkdir -p $@

# The embedded default: file:var store, dry-run telephony, 127.0.0.1:8080. `serve` puts
# oncall_config.example.json into the store when it holds no operational config yet.
run: $(RUN_STAMP) | var
	$(BIN)/oncall-pager serve -c config.ini.example

# ruff runs quietly here (it prints only problems), so on success pytest's summary line
# stays the last line of the output, where CI looks for it.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2
	@$(BIN)/ruff check --quiet .

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench_oncall_pager.py

# requirements.lock: every runtime dependency (twilio, boto3, waitress and theirs) pinned with
# its hashes, for `pip install --require-hashes -r requirements.lock` on a server. pip-tools is
# a tool of this target only: installed into .venv on demand, never a dependency of the pager.
# Run it after changing [project] dependencies in pyproject.toml, or to take upgrades.
lock: $(STAMP)
	$(BIN)/pip install --quiet 'pip-tools>=7.4'
	CUSTOM_COMPILE_COMMAND='make lock' $(BIN)/pip-compile --quiet --generate-hashes \
		--strip-extras --no-emit-index-url --no-emit-find-links --upgrade \
		--output-file requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) var build dist *.egg-info __pycache__ .pytest_cache .ruff_cache .hypothesis
	rm -f oncall_config.cache.json
