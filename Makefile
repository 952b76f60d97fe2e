# Two entry points: `make serve` (everything needed to serve the demo model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 3000
DEMO ?= sota-demo

# ONNX Runtime's build: `gpu` (onnxruntime-gpu with CUDA from its wheels) where an NVIDIA GPU
# answers nvidia-smi, `cpu` (onnxruntime) otherwise; `make test RUNTIME=cpu` chooses by hand.
RUNTIME ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
ifeq ($(filter $(RUNTIME),cpu gpu),)
$(error RUNTIME must be cpu or gpu, got '$(RUNTIME)')
endif
ifneq ($(filter command line environment,$(origin RUNTIME)),)
WHY := RUNTIME=$(RUNTIME) was given
else ifeq ($(RUNTIME),gpu)
WHY := nvidia-smi lists an NVIDIA GPU; RUNTIME=cpu for the CPU build
else
WHY := nvidia-smi finds no NVIDIA GPU; RUNTIME=gpu for the CUDA build
endif
ORT_cpu := onnxruntime
ORT_gpu := onnxruntime-gpu
OTHER := $(if $(filter gpu,$(RUNTIME)),cpu,gpu)

.PHONY: runtime install install-serve serve demo test test-fast test-gpu lint bench mlserver-peer clean

runtime:
	@echo "==> ONNX Runtime: the $(RUNTIME) build ($(ORT_$(RUNTIME))): $(WHY)"

# One venv; each target installs the extras it needs (pyproject.toml) and the runtime's extra:
# serving the demo needs `http` and, to train it the first time, `train`; the tests need
# everything. The stamp names the runtime, so a venv of the other one is switched: pip never
# removes one build when the other is added, and both write the same `onnxruntime` module, so
# both go before the chosen one is installed.
$(BIN)/.installed-%: pyproject.toml
	@echo "==> installing sota-serve[$*] into $(VENV) (torch, fastai, BentoML, ONNX Runtime: a few minutes the first time)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -m pip show -q $(ORT_$(OTHER)) 2>/dev/null; then \
		echo "==> $(VENV) has the $(OTHER) build ($(ORT_$(OTHER))): uninstalling it first"; \
		$(BIN)/python -m pip uninstall -y -qq $(ORT_cpu) $(ORT_gpu); \
		rm -f $(BIN)/.installed-*,$(OTHER); \
	fi
	$(BIN)/python -m pip install -q -e '.[$*]'
	touch $@

install: runtime $(BIN)/.installed-test,$(RUNTIME)

install-serve: runtime $(BIN)/.installed-http,train,$(RUNTIME)

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

# MLServer 1.7, the peer of `python -m dev.probes.grpc_probe PACKAGE --mlserver`, in a venv of its
# own (its pins conflict with the project's), with this checkout's core and the CPU runtime.
# uvloop<0.22: from 0.22 MLServer 1.7.1's inference workers die at start (SeldonIO/MLServer#2286).
MLSERVER_VENV ?= bench/.cache/mlserver-venv
mlserver-peer: $(MLSERVER_VENV)/bin/mlserver

$(MLSERVER_VENV)/bin/mlserver: pyproject.toml
	test -x $(MLSERVER_VENV)/bin/python || $(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/python -m pip install -q --upgrade pip
	$(MLSERVER_VENV)/bin/python -m pip install -q 'mlserver==1.7.*' 'uvloop<0.22' -e '.[cpu]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
