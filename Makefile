.PHONY: demo test bench lint
demo:
	./scripts/demo.sh
test:
	./scripts/test.sh
bench:
	./scripts/bench.sh
lint:
	./scripts/setup.sh && .venv/bin/ruff check src tests bench && .venv/bin/mypy
