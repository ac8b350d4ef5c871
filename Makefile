# The two set-up commands of the README: `make serve` and `make test`.
# Both create/update .venv at the repo root from pyproject.toml and are no-ops when nothing changed.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
MODEL  := models/shapes-clip

.PHONY: serve test lint format clean-venv

$(STAMP): pyproject.toml client/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ./client -e '.[serve,bench,dev]'
	@touch $(STAMP)

# The shipped model is committed; this rebuilds it only if it is missing.
$(MODEL)/model.safetensors: | $(STAMP)
	$(BIN)/reward-service train-clip --out $(MODEL)

serve: $(STAMP) $(MODEL)/model.safetensors
	$(BIN)/reward-service serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean-venv:
	rm -rf $(VENV)

# A bounded Locust run (about 2 minutes, at most 3) against a stack it starts and stops: REST and
# gRPC users closed loop, then the trainer shape over each; CSV, HTML and plots in loadtest-results/.
loadtest: $(STAMP) $(MODEL)/model.safetensors
	$(BIN)/python -m loadtest.run_locust --start-stack --out loadtest-results \
		--scenario rest --scenario grpc --scenario trainer-rest --scenario trainer-grpc \
		-u 8 -t 20 --images 8 --ranks 4 --step-s 5 --steps 3
.PHONY: loadtest
