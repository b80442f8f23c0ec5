# The two set-up commands of the README are `make run` and `make test`.
VENV := .venv/bin

.PHONY: install run test lint

install:
	bash scripts/install.sh

run: install
	$(VENV)/siterecovery serve --vault $${SITERECOVERY_VAULT:-siterecovery-vault} --port $${PORT:-8470} --lab

test: install lint
	$(VENV)/pytest -q

lint:
	$(VENV)/ruff check src tests
	$(VENV)/mypy
