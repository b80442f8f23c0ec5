# The two set-up commands of the README are `make run` and `make test`.
VENV := .venv/bin

.PHONY: install run test lint bench

install:
	bash scripts/install.sh

run: install
	$(VENV)/siterecovery serve --vault $${SITERECOVERY_VAULT:-siterecovery-vault} --port $${PORT:-8470} --lab

test: install lint
	$(VENV)/pytest -q

lint:
	$(VENV)/ruff check src tests
	$(VENV)/mypy

# The data-plane benchmark (docs/PERFORMANCE.md): generates its images in /tmp,
# compares with cp, qemu-img, nbdcopy and rsync. BENCH_ARGS=--quick for a smoke test.
bench: install
	$(VENV)/python -m bench.datapath $(BENCH_ARGS)
