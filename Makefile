# Two commands on a fresh machine: `make demo` and `make test`. Each creates
# .venv and installs what it needs. torch is pinned to 2.13.0 here (a CPU build
# that pip finds locally); pyproject.toml keeps a permissive range for users.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-integration test-slow test-all bench-smoke lint typecheck clean healthcare healthcare-flower

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	# flwr is pinned for the same reason: 1.42 needs a certifi release the package mirror lacks.
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,flower]' 'flwr==1.41.0'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/securefl compare examples/digits_fedmd.yaml --protocols fedmd local_only --out runs/demo
	@echo "Run directories, reports and plots: runs/demo/fedmd and runs/demo/local_only"

# The healthcare silo example: four hospitals' own files, policies and models; private FedMD with CKKS.
healthcare: $(STAMP)
	$(BIN)/python examples/healthcare/make_data.py
	rm -rf runs/healthcare
	$(BIN)/securefl run examples/healthcare/experiment.yaml --out runs/healthcare
	$(BIN)/securefl audit runs/healthcare
	@echo "Report: runs/healthcare/report.md; one page per hospital: runs/healthcare/participants/"

# The same on a real Flower federation on this machine: a SuperLink and one SuperNode per hospital. Each node
# requires its owner's approval of the run (signed in nodes/<id>/approvals/, as `securefl approve --yes` would)
# and refuses any other setup, or one weaker than its policy file.
healthcare-flower: $(STAMP)
	$(BIN)/python examples/healthcare/make_data.py
	rm -rf runs/healthcare-flower
	$(BIN)/securefl flower-loopback examples/healthcare/experiment.yaml --out runs/healthcare-flower
	@echo "Coordinator: runs/healthcare-flower/coordinator; each hospital's node (its approval, ledger, report): runs/healthcare-flower/nodes/"

# The fast suite, on both cores (pytest-xdist). End-to-end runs are `integration`, slow ones `slow`; CI runs all.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m 'integration and not slow'

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]  # exit 5 = no slow tests selected

test-all: test test-integration test-slow

# Every protocol of A1, and A2's rows, for 2 rounds on real Fashion-MNIST (6,000 records, one seed): catches a
# protocol broken on real data; and the DP learning-rate check for 2 epochs.
bench-smoke: $(STAMP)
	$(BIN)/python benchmarks/accuracy.py --quick --setting all --jobs 2
	$(BIN)/python benchmarks/dp_lr.py --quick

# ruff, and who may import whom (import-linter, contracts in pyproject.toml: the floors of architecture.md).
lint: $(STAMP)
	$(BIN)/ruff check securefl tests benchmarks
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy securefl

clean:
	rm -rf $(VENV) runs .pytest_cache
