# make run   set everything up, then run the daemon on the built-in demo model
# make test  set everything up, then run the tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch kept on disk; a loose requirement would pull a
# multi-GB CUDA build. A GPU install passes its own: TORCH="torch==... --index-url ..."
TORCH  ?= torch==2.13.0+cpu
STAMP  := $(VENV)/.moed-installed

.PHONY: run test setup build clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard cython_src/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH)
	$(PY) -m pip install "setuptools>=68" wheel "Cython>=3.0"
	MOED_BUILD_JOBS=2 $(PY) -m pip install --no-build-isolation -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	@set -e; port=$${MOED_PORT:-50051}; http=$${MOED_HTTP_PORT:-8000}; \
	ctl="$(PY) -m moed.cli.moectl --target 127.0.0.1:$$port"; \
	export MOED_ADMIN_TOKEN=$${MOED_ADMIN_TOKEN:-demo-$$$$}; \
	$(PY) -m moed.cli.daemon --port $$port --http-port $$http & pid=$$!; \
	trap 'kill -TERM $$pid 2>/dev/null || true; wait $$pid || true' EXIT INT TERM; \
	$$ctl health --wait 600 >/dev/null; \
	$$ctl generate "Tell me a story about a king." --chat --max-new-tokens 96 \
	    --temperature 0.8 --top-p 0.95 --seed 0; \
	$$ctl bench --streams 16 --prompt-tokens 32 --output-tokens 32; \
	$$ctl status; \
	echo; echo "moed is serving the demo model; Ctrl-C stops it. Reach it with:"; \
	echo "  $(VENV)/bin/moectl --target 127.0.0.1:$$port generate 'Speak of love.' --chat"; \
	echo "  MOED_ADMIN_TOKEN=$$MOED_ADMIN_TOKEN $(VENV)/bin/moectl --target 127.0.0.1:$$port status"; \
	echo "  grpcurl -plaintext 127.0.0.1:$$port list      # gRPC, through server reflection"; \
	echo "  curl -sN http://127.0.0.1:$$http/v1/chat/completions -H 'Content-Type: application/json' \\"; \
	echo "    -d '{\"model\": \"moed-demo\", \"stream\": true, \"messages\": [{\"role\": \"user\", \"content\": \"Speak of love.\"}]}'"; \
	echo "  python -c 'from openai import OpenAI; c = OpenAI(base_url=\"http://127.0.0.1:$$http/v1\", api_key=\"none\"); \\"; \
	echo "    print(c.chat.completions.create(model=\"moed-demo\", messages=[{\"role\": \"user\", \"content\": \"Speak of love.\"}]).choices[0].message.content)'"; \
	echo "  curl -s http://127.0.0.1:$$http/metrics        # Prometheus"; \
	wait $$pid

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf build *.egg-info $(VENV); find moed -name "*.so" -delete
