# Two commands: `make demo` and `make test`. Both install first (idempotent, quick when nothing changed).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check
STAMP := $(VENV)/.installed
BEAM_STAMP := $(VENV)/.installed-beam
OP_DIR := custom_ops/roi_align_3d
OP_SO := $(OP_DIR)/_roi_align_3d.so
OP_SRC := $(wildcard $(OP_DIR)/*.cc $(OP_DIR)/*.h $(OP_DIR)/*.cu.cc $(OP_DIR)/build.py)
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=
DEMO_ARGS ?=
# oneDNN's Conv3D kernels (off by default on CPUs without AVX-512 VNNI): ~5x faster training steps.
# tf_agg3d sets it too, but only when imported before TensorFlow; tests and benches may not be.
export TF_ENABLE_ONEDNN_OPTS ?= 1
# pip prints one warning per empty local index folder; they say nothing about this install.
PIP_FILTER := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: install install-beam op demo demo-deeplesion test test-fast lint smoke-newest clean bench

install: $(STAMP) op

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python requirements/pinned.txt setup.cfg pyproject.toml
	set -o pipefail; $(PIP) install -q -r requirements/pinned.txt 2>&1 | $(PIP_FILTER)
	set -o pipefail; $(PIP) install -q --no-deps tensorflow-serving-api==2.16.1 2>&1 | $(PIP_FILTER)
	set -o pipefail; $(PIP) install -q --no-deps --no-build-isolation -e . 2>&1 | $(PIP_FILTER)
	touch $(STAMP)

# The Beam batch jobs' extra (tf_agg3d.pipelines), installed with pinned.txt so that its protobuf stays.
install-beam: $(BEAM_STAMP)

$(BEAM_STAMP): $(STAMP) requirements/beam.txt
	set -o pipefail; $(PIP) install -q -r requirements/pinned.txt -r requirements/beam.txt 2>&1 | $(PIP_FILTER)
	touch $(BEAM_STAMP)

# The custom op is optional at run time (pure-TF fallback) but always built here when its sources exist.
op: $(STAMP)
	@if [ -n "$(OP_SRC)" ]; then $(MAKE) --no-print-directory $(OP_SO); else echo "custom op sources absent; skipping"; fi

$(OP_SO): $(OP_SRC) $(STAMP)
	$(PY) $(OP_DIR)/build.py

demo: install
	PYTHONUNBUFFERED=1 $(PY) -m tf_agg3d.demo --out $(DEMO_OUT) $(DEMO_ARGS)

# The whole chain on synthetic DeepLesion: generate, convert, train, predict on split 3, FROC per lesion type.
demo-deeplesion: install
	PYTHONUNBUFFERED=1 $(PY) -m tf_agg3d.demo_deeplesion --out $(DEMO_OUT)/deeplesion

test: install $(BEAM_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install $(BEAM_STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check tf_agg3d tests bench custom_ops
	$(VENV)/bin/ruff format --check tf_agg3d tests bench custom_ops

# The declared range `tensorflow>=2.16,<2.22` must be true: newest TF 2.x, no tensorflow-io, smoke subset.
smoke-newest:
	bash .ci/smoke_newest.sh

bench: install
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .venv-newest build *.egg-info $(OP_SO) $(OP_DIR)/_roi_align_3d.json $(DEMO_OUT)
