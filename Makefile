# The two commands a new user needs (see README.md):
#   make demo   set up, train a small GPT from scratch, sample from it
#   make test   set up, lint, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint format clean

$(BIN)/gptkit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/gptkit
	$(BIN)/gptkit demo

test: $(BIN)/gptkit lint
	$(BIN)/python -m pytest

lint: $(BIN)/gptkit
	$(BIN)/ruff format --check gptkit tests bench
	$(BIN)/ruff check gptkit tests bench

format: $(BIN)/gptkit
	$(BIN)/ruff format gptkit tests bench
	$(BIN)/ruff check --fix gptkit tests bench

clean:
	rm -rf $(VENV) runs *.egg-info
