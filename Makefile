# The two set-up commands of the README are `make run` and `make test`.
VENV := .venv/bin

.PHONY: install run test test-faults test-lifecycle lint bench

install:
	bash scripts/install.sh

run: install
	$(VENV)/siterecovery serve --vault $${SITERECOVERY_VAULT:-siterecovery-vault} --port $${PORT:-8470} --lab

# The default suite (~12 min on 2 cores): everything but the fault matrix; the
# few `slow` cases in it are short. `.ci/run` adds test-faults and test-lifecycle.
test: install lint
	$(VENV)/pytest -q -m "not faults"

# The SIGKILL fault matrix (tests/faults): a kill before and after every step of
# every job type, generated from the workflows' traced steps; ~20 min on 2 cores.
test-faults: install
	$(VENV)/pytest -q -m faults tests/faults

# The lifecycle state machine (tests/lifecycle) at the issue's bound: 20 sequences
# of up to 12 steps on one daemon, ~7 min (`make test` runs 3 of up to 8).
test-lifecycle: install
	SR_FSM_EXAMPLES=$${SR_FSM_EXAMPLES:-20} SR_FSM_STEPS=$${SR_FSM_STEPS:-12} \
		$(VENV)/pytest -q -s tests/lifecycle

lint:
	$(VENV)/ruff check src tests
	$(VENV)/mypy

# The data-plane benchmark (docs/PERFORMANCE.md): generates its images in /tmp,
# compares with cp, qemu-img, nbdcopy and rsync. BENCH_ARGS=--quick for a smoke test.
bench: install
	$(VENV)/python -m bench.datapath $(BENCH_ARGS)
