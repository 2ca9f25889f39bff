# Two commands on a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# A stamp per extras set: reinstall only when pyproject.toml changes.
STAMP  := $(VENV)/.installed

.PHONY: demo test lint lint-protos format protos compose browser bench-search bench-embed bench-grpc bench-labeling bench-labeling-scale bench-labeling-classes bench-labeling-job bench-keys venv redis clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP)-%: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[$*]"
	@touch $@

venv: $(STAMP)-test,dev,bench,data,embed,scale,ui

demo: $(STAMP)-data,embed
	$(BIN)/embedstore demo

test: $(STAMP)-test,dev,bench,data,embed,scale,ui redis compose browser
	$(BIN)/pytest

lint: $(STAMP)-test,dev,bench,data,embed,scale,ui
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)-test,dev,bench,data,embed,scale,ui
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Regenerate embedstore.v1 from protos/embedstore/v1/*.proto (a test checks it is fresh).
protos: $(STAMP)-test,dev,bench,data,embed,scale,ui
	$(PY) protos/generate.py

# buf's STANDARD lint rules on the .proto files (protos/buf.yaml); needs Node's npx, so not part of CI.
lint-protos:
	npx --yes @bufbuild/buf@1.75.0 lint protos

bench-search: $(STAMP)-bench
	$(PY) benchmarks/search.py --n $${N:-100000}

bench-embed: $(STAMP)-test,dev,bench,data,embed,scale,ui
	$(PY) benchmarks/embed.py

bench-grpc: $(STAMP)-test,dev,bench,data,embed,scale,ui
	$(PY) benchmarks/grpc_load.py --n $${N:-100000}

# Issue 7's evidence: every method on real data (QUICK=1: emoji, 5% seed, one seed - a few minutes).
bench-labeling: $(STAMP)-test,dev,bench,data,embed,scale,ui
	$(PY) benchmarks/self_training.py $${QUICK:+--quick}

# Issue 8's evidence: labeling points/s and peak RSS at 100k and 1M, and the 100M extrapolation.
bench-labeling-scale: $(STAMP)-test,dev,bench,data,embed,scale,ui
	$(PY) benchmarks/labeling_scale.py

# Seconds per iteration and per fit as the class count grows (10, 30, 100 classes; both learners).
bench-labeling-classes: $(STAMP)-test,dev,bench,data,embed,scale,ui
	$(PY) benchmarks/labeling_classes.py

# One full 10-iteration job with its stage timings (the 100k / 10-minute target).
bench-labeling-job: $(STAMP)-test,dev,bench,data,embed,scale,ui
	$(PY) benchmarks/labeling_job.py --n $${N:-100000}

bench-keys: $(STAMP)-test,dev,bench,data,embed,scale,ui redis
	$(PY) benchmarks/keys.py

# Tests start their own redis-server on a free loopback port; make sure the binary exists.
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "redis-server missing: installing Debian's redis-server"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null; \
	  else \
	    echo "redis-server is missing and this is not a root Debian shell. Install it, e.g.:"; \
	    echo "  sudo apt-get install redis-server   # Debian/Ubuntu"; \
	    echo "  brew install redis                  # macOS"; \
	    exit 1; \
	  fi; }
	@redis-server --version

# tests/test_deploy.py validates the compose files with Debian's docker-compose (no Docker engine needed), and
# checks the cluster's load balancer config (deploy/qdrant-lb.cfg) with Debian's haproxy, failover included.
compose:
	@{ command -v docker-compose >/dev/null 2>&1 && PATH="$$PATH:/usr/sbin" command -v haproxy >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "docker-compose/haproxy missing: installing Debian's (compose: only 'config' is used, no engine)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose haproxy >/dev/null; \
	  else \
	    echo "docker-compose or haproxy is missing and this is not a root Debian shell. Install them, e.g.:"; \
	    echo "  sudo apt-get install docker-compose haproxy   # Debian/Ubuntu (validation only, no engine needed)"; \
	    exit 1; \
	  fi; }

# tests/test_ui.py drives Debian's chromium through its chromedriver (Selenium; nothing downloaded at run time).
browser:
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "chromium/chromedriver missing: installing Debian's chromium and chromium-driver"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; \
	  else \
	    echo "chromium and chromedriver are missing and this is not a root Debian shell. Install them, e.g.:"; \
	    echo "  sudo apt-get install chromium chromium-driver   # Debian/Ubuntu"; \
	    exit 1; \
	  fi; }

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache data build *.egg-info
