# The two set-up commands of the README are `make run` and `make test`.
VENV := .venv/bin

.PHONY: install run test test-faults test-lifecycle test-netns test-guest lint bench bench-agents

install:
	bash scripts/install.sh

# LAB_PROVIDER=libvirt: the lab's hosts are private libvirtds with real Linux guests.
LAB_PROVIDER ?= local

run: install
	$(VENV)/siterecovery serve --vault $${SITERECOVERY_VAULT:-siterecovery-vault} --port $${PORT:-8470} \
		--lab --lab-provider $(LAB_PROVIDER)

# The default suite (~12 min on 2 cores): everything but the fault matrix and the
# network-namespace suite; the few `slow` cases in it are short. `.ci/run` adds
# test-faults, test-lifecycle and test-netns.
test: install lint
	$(VENV)/pytest -q -m "not faults and not netns and not guest"

# The SIGKILL fault matrix (tests/faults): a kill before and after every step of
# every job type, generated from the workflows' traced steps; ~20 min on 2 cores.
test-faults: install
	$(VENV)/pytest -q -m faults tests/faults

# Sites as separate hosts (tests/netns): the engine and each site agent in a
# network namespace of its own, links cut, rate-limited and captured for real;
# needs root and iproute2 (ip netns, tc; installed here if missing); 5 tests,
# ~4 min on 2 cores.
test-netns: install
	command -v tc >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2; }
	$(VENV)/pytest -q -m netns tests/netns

# Real Linux guests (tests/libvirt, marker guest): the lab guest built from
# Debian packages (apt-get download; cached in ~/.cache/siterecovery/guest) and
# booted under TCG in private libvirtd hosts: the building blocks, the tracking
# contract, the hypervisor and the lifecycle through the engine on kvm hosts;
# ~10 min on 2 cores, ~30 s more for a cold build.
test-guest: install
	$(VENV)/pytest -q -m guest tests/libvirt tests/providers

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

# The site agents' benchmark (docs/PERFORMANCE.md, "Site agents"): a pass, RPO under
# 10 MB/s of guest writes and the wire against nbdcopy, with the engine and two agents
# in network namespaces (tests/netns/lab.py) against sites in the engine's process.
# Needs root and iproute2 (installed here if missing); ~15 min on 2 cores,
# BENCH_ARGS=--quick ~5 min (a smoke test), BENCH_ARGS="--json FILE" keeps every number.
bench-agents: install
	command -v tc >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2; }
	$(VENV)/python bench/agents.py $(BENCH_ARGS)
