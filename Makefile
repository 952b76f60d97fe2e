# Two entry points: `make serve` (everything needed to serve the demo model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 3000
DEMO ?= sota-demo

.PHONY: install install-serve serve demo test test-fast test-gpu lint bench clean

# One venv; each target installs the extras it needs (pyproject.toml): serving the demo needs
# `serve` and, to train it the first time, `train`; the tests need everything.
$(BIN)/.installed-%: pyproject.toml
	@echo "==> installing sota-serve[$*] into $(VENV) (torch, fastai, BentoML, ONNX Runtime: a few minutes the first time)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$*]'
	touch $@

install: $(BIN)/.installed-test

install-serve: $(BIN)/.installed-serve,train

# Train and import the demo model unless the BentoML store already has it.
demo: install-serve
	@$(BIN)/bentoml models get $(DEMO):latest >/dev/null 2>&1 \
		|| { echo "==> training the demo model (handwritten digits, 3-4.5 minutes on 2 idle AMD EPYC cores, longer on busy ones), then evaluating, exporting and quantizing it"; \
		     $(BIN)/sota-serve demo --name $(DEMO); }

serve: demo
	@echo "==> serving $(DEMO) on http://localhost:$(PORT) once the log says 'ready'. open http://localhost:$(PORT)/ (API docs: /docs); try: curl -F image=@examples/seven.png localhost:$(PORT)/classify"
	$(BIN)/bentoml serve --port $(PORT)

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

# The tests marked gpu, which `make test` leaves out: ONNX Runtime's CUDA provider, fp16, batch
# padding, GPU decoding and a multi-worker server on one GPU (minutes). Strict: on a machine
# without a CUDA device each fails, saying so.
test-gpu: install
	SOTA_SERVE_TEST_STRICT=1 $(BIN)/python -m pytest -m gpu

lint: install
	$(BIN)/ruff check sota_serve training bento rayserve bench dev tests

bench: install
	$(BIN)/sota-serve bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
