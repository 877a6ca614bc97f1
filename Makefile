# afc: `make demo` runs the main job end to end; `make test` runs the whole suite.
# Both install what is missing and start the local test bed first.
# Python runs with -P: the repo root must never be on sys.path, where operator/ (afc.operator)
# would shadow the standard library's `operator`.
SHELL := /bin/bash
PY := .venv/bin/python
PYTEST := .venv/bin/pytest
TESTBED := python3 scripts/testbed.py
PYTEST_ARGS ?=

.PHONY: deps testbed testbed-down testbed-clean testbed-status test unit demo demo-runtime bench bench-scaling bench-rollout bench-operator bench-concurrency bench-cluster bench-lowrate bench-stages bench-report soak crds pins

deps:
	bash scripts/install-deps.sh

testbed: deps
	$(TESTBED) up

testbed-down:
	$(TESTBED) down

testbed-clean:
	$(TESTBED) clean

testbed-status:
	$(TESTBED) status

# The test bed's node agent (a kubelet stand-in, scripts/nodeagent.py), in the foreground:
# registers Node $(NODE) and runs the pods bound to it as local processes; Ctrl-C stops them.
.PHONY: node-agent
NODE ?= afc-node-1
NODE_AGENT_ARGS ?=
node-agent: testbed
	set -a; source .testbed/env; set +a; $(PY) -P scripts/nodeagent.py --node $(NODE) $(NODE_AGENT_ARGS)

test: testbed
	set -a; source .testbed/env; set +a; $(PYTEST) $(PYTEST_ARGS)

unit: deps
	$(PYTEST) -m unit $(PYTEST_ARGS)

# The mission end to end: node agent, operator from manifests/, autoscaling, a rollout, a
# SIGKILL, scale-down (scripts/demo.py). The runtime alone: make demo-runtime.
demo: testbed
	set -a; source .testbed/env; set +a; $(PY) -P scripts/demo.py

demo-runtime: testbed
	set -a; source .testbed/env; set +a; $(PY) -P -m afc.runtime.demo

bench: testbed
	set -a; source .testbed/env; set +a; $(PY) -P bench/run.py && $(PY) -P bench/concurrency.py && $(PY) -P bench/scaling.py \
		&& $(PY) -P bench/rollout.py && $(PY) -P bench/operator.py && $(PY) -P bench/cluster.py && $(PY) -P bench/lowrate.py \
		&& $(PY) -P bench/stages.py

# afc's CPU by thread idle, at 500 and at 5,000 msg/s, with librdkafka's fetch defaults and with a
# 2 ms broker-side fetch wait, and on asyncio's loop instead of uvloop; bench/results/lowrate.json (~3 minutes).
bench-lowrate: testbed
	set -a; source .testbed/env; set +a; $(PY) -P bench/lowrate.py

# A record's time inside afc step by step (fetch, loop, claim and hand-off, handler) at 500 and
# 5,000 msg/s, with and without the fetch linger, on uvloop and on asyncio's loop, beside a
# scheduler-stall probe; bench/results/stages.json (~6 minutes).
bench-stages: testbed
	set -a; source .testbed/env; set +a; $(PY) -P bench/stages.py

# A 3-process group's throughput with the idempotency store on the single Redis and on the
# bed's 3-master Redis Cluster, alternating rounds; bench/results/cluster.json (~2 minutes).
bench-cluster: testbed
	set -a; source .testbed/env; set +a; $(PY) -P bench/cluster.py

# Issue 13's adaptive handler concurrency against fixed flow.workers on a simulated downstream of
# known capacity (async 5 ms, sync 1 ms, a mid-run slowdown); bench/results/concurrency.json and .png (~4 minutes).
bench-concurrency: testbed
	set -a; source .testbed/env; set +a; $(PY) -P bench/concurrency.py

# Issue 14's operator at scale: 1,000 AdaptiveConsumers, the operator's apiserver requests per minute at
# rest, CPU, RSS, time for a change to reach the StatefulSet; bench/results/operator.json (~5 minutes).
# BASELINE=/work/main measures that checkout's operator first, in the same run (~10 minutes more).
BASELINE ?=
bench-operator: testbed
	set -a; source .testbed/env; set +a; $(PY) -P bench/operator.py $(if $(BASELINE),--baseline $(BASELINE))

# Issue 11's rolling restarts: N = 4 and 8 members, static vs eager vs cooperative-sticky vs KIP-848,
# rebalances counted in the broker's log; results in bench/results/rollout.json (~7 minutes on the test bed).
bench-rollout: testbed
	set -a; source .testbed/env; set +a; $(PY) -P bench/rollout.py

# Issue 9's chaos soak: 3 members, 100k records, 3 SIGKILLs, mark_done_in; N runs (SOAK_RUNS,
# default 5), results in bench/results/chaos.json.
SOAK_RUNS ?= 5
soak: testbed
	set -a; source .testbed/env; set +a; $(PY) -P bench/chaos.py --runs $(SOAK_RUNS)

# The CRD and its reference (docs/reference.md) are generated from the models; a test fails when either drifts.
crds: deps
	$(PY) -P -m afc.operator.crd > crds/afc.dev_adaptiveconsumers.yaml
	$(PY) -P -m afc.operator.reference > docs/reference.md

# Exact pins for the images (docker/constraints.txt) from the virtualenv.
pins: deps
	$(PY) -P docker/pin.py > docker/constraints.txt

# The lag autoscaler (afc.operator.scaling.decide) against KEDA + HPA defaults, simulated:
# bench/results/scaling.json and scaling.png. No test bed needed.
bench-scaling: deps
	$(PY) -P bench/scaling.py

# docs/benchmarks.md and docs/img/bench-*.png from bench/results/*.json (no test bed needed).
bench-report: deps
	$(PY) -P bench/report.py
