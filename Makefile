.PHONY: demo test bench bench-worker runner-load lint
demo:
	./scripts/demo.sh
test:
	./scripts/test.sh
bench:
	./scripts/bench.sh
bench-worker:
	./scripts/bench-worker.sh
runner-load:
	./scripts/runner-load.sh
lint:
	./scripts/setup.sh && .venv/bin/ruff check src tests bench && .venv/bin/mypy
