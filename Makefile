# The two commands a new user runs: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements

.PHONY: demo test test-slow lint ablation fmnist clean-venv

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# The default tier: every module's tests, minutes on 2 cores. The slow tier: end-to-end runs (kills, launchers,
# demos); .ci/run runs both.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) -m experiments.demo

clean-venv:
	rm -rf $(VENV)

ablation: $(STAMP)
	$(PY) -m experiments.ablation

.PHONY: demo-gen
demo-gen: $(STAMP)
	$(PY) -m experiments.demo_gen

# Fashion-MNIST (Debian's dataset-fashion-mnist): teacher + 14 rows x 5 seeds, resumable; niced, one thread a run, two side by side.
fmnist: $(STAMP)
	nice -n 19 $(PY) -m experiments.fmnist
