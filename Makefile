# The two commands a new user needs:
#   make demo   set up, then train the tiny task locally (a few minutes on 2 CPU cores)
#   make test   set up, then run every check and test
.PHONY: setup demo test lint protos clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/lpreg local examples/tiny/config.yaml

test:
	@LPREG_EXTRAS=dev,vllm bash scripts/setup.sh
	@bash scripts/test.sh

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy lpreg_core

protos: setup
	.venv/bin/python scripts/gen_protos.py

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
