# nld-gateway developer entry points. Every target bootstraps .venv idempotently.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= models/nld-tiny-pystdlib
POLICY ?= policies/presets/adaptive_cpu.yaml
BENCH_MODEL ?= .cache/bench-nld

.PHONY: venv system-deps run test test-fast bench clean chart-schema chart-presets

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch must come first: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

venv: $(STAMP)

# Prometheus (Debian's package) for the policy integration tests; installed when missing.
system-deps:
	@command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing prometheus (apt-get) ..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

# The whole stack on the embedded model: Ray Serve replicas + the gateway on http://127.0.0.1:8000
run: $(STAMP)
	$(PY) -m gateway up --model $(MODEL) --policy $(POLICY)

test: $(STAMP) system-deps
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The chart's values.schema.json, generated from its typed source (deploy/helm/values_schema/).
chart-schema: $(STAMP)
	$(PY) -m deploy.helm.values_schema

# The chart's copy of the policy presets (Helm reads only files inside the chart; a test keeps them equal).
chart-presets:
	rm -f deploy/helm/nld-gateway/files/policies/*.yaml
	cp policies/presets/*.yaml deploy/helm/nld-gateway/files/policies/

$(BENCH_MODEL)/config.json: | $(STAMP)
	$(PY) -c "from replicas.engine.testing import write_random_checkpoint as w; w('$(BENCH_MODEL)', layers=8, hidden=512, heads=8, kv_heads=4, head_dim=64, intermediate=1536, vocab=8192, block_size=32, lora_rank=16)"

# Benchmarks: tables on stdout, JSON and PNG under benchmarks/results/ (see docs/PERFORMANCE.md).
bench: $(STAMP) $(BENCH_MODEL)/config.json
	$(PY) benchmarks/engine_modes.py --model $(BENCH_MODEL) --prompts 4 --max-new-tokens 64 --threads 1 \
	  --algorithms linear --out benchmarks/results/engine_modes_bench_random.json
	$(PY) benchmarks/engine_modes.py --model $(MODEL) --heldout $(MODEL)/split.json --block-lengths 16,32 \
	  --algorithms linear --threads 1 --out benchmarks/results/engine_modes_tiny.json
	# does self-speculation pay on prompts cut anywhere in a file (issue 20)
	$(PY) benchmarks/positions_speed.py --model $(MODEL)
	# quadratic self-speculation (issue 15) next to linear at B 4, 8, 16
	$(PY) benchmarks/engine_modes.py --model $(MODEL) --heldout $(MODEL)/split.json --block-lengths 4,8,16 \
	  --no-diffusion --threads 1 --out benchmarks/results/engine_modes_quadratic.json
	$(PY) benchmarks/concurrency.py --model $(MODEL) --heldout $(MODEL)/split.json --threads 1
	# engine v2 (issue 13) against the engine before it, in one process
	$(PY) benchmarks/concurrency.py --model $(MODEL) --heldout $(MODEL)/split.json --threads 1 --baseline 3436d04 \
	  --rounds 5 --prompt-len 32 --max-new-tokens 32 --block-length 16 --out benchmarks/results/engine_v2_concurrency.json
	$(PY) benchmarks/engine_v2.py capacity --model $(MODEL)
	$(PY) benchmarks/engine_v2.py ttft --model $(MODEL)
	$(PY) benchmarks/engine_v2.py itl --model $(MODEL)
	$(PY) benchmarks/gateway_overhead.py
	$(PY) benchmarks/bf16_agreement.py --model $(MODEL)
	$(PY) benchmarks/adaptive.py --model $(MODEL)
	# where the full stack's latency tail comes from (slow requests against each process's CPU)
	$(PY) benchmarks/tail_profile.py --model $(MODEL)
	# the stack against the bare engine, split by the engine's own counters (shared CPUs, then a CPU for serving)
	$(PY) benchmarks/stack_vs_bare.py --model $(MODEL) --layout shared
	$(PY) benchmarks/stack_vs_bare.py --model $(MODEL) --layout pinned
	# the engine's float32 CPU linear layers: a forward's matmuls per layout, the bare engine with oneDNN on and off
	$(PY) benchmarks/cpu_linears.py --model $(MODEL)

clean:
	rm -rf $(VENV) .cache .pytest_cache
