# privlora: `make demo` and `make test` install what they need, then run. Idempotent: a second run
# does not reinstall (the stamp files record what is installed).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo docs test test-slow bench lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: 2.13.0 is a CPU wheel already on disk; anything that depends on torch later
# then finds it satisfied instead of pulling the multi-GB CUDA build.
$(VENV)/.torch: | $(VENV)/bin/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	touch $@

# rapidocr-onnxruntime depends on the GUI opencv-python (needs libGL; OpenCV 5 has no Haar cascades):
# drop it and put the headless 4.x build back, last, so that `import cv2` is the headless one.
# every extra (registry, split, federated, postgres, distributed: pyproject.toml), so the tests see all of privlora
EXTRAS := dev,registry,split,federated,postgres,distributed
# constraints.txt: the tested versions inside pyproject.toml's ranges (CI installs exactly what passed here)
$(STAMP): $(VENV)/.torch pyproject.toml constraints.txt
	$(PIP) install -q -e ".[$(EXTRAS)]" -c constraints.txt
	$(PIP) uninstall -q -y opencv-python opencv-contrib-python
	$(PIP) install -q --force-reinstall --no-deps "opencv-python-headless>=4.8,<5" -c constraints.txt
	touch $@

# exiftool checks the sanitized files' bytes in the tests (root on the CI-class machine)
$(VENV)/.debian: | $(VENV)/bin/python
	command -v exiftool >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libimage-exiftool-perl)
	touch $@

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

# Two pytest workers (pytest-xdist), one per core; each test file stays on one worker so its module
# fixtures (trained runs, started servers) are built once. Tests are single-threaded (conftest).
TEST_WORKERS ?= 2
# The docs site (README + docs/, see mkdocs.yml) into site/. Not -q: in MkDocs 1.6 it hides the
# warnings that --strict counts, and a broken link would pass.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d site

test: $(STAMP) $(VENV)/.debian docs
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

# Debian's chromium renders the audit report in the slow browser test (root on the CI-class machine).
$(VENV)/.chromium: | $(VENV)/bin/python
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	touch $@

# Debian's PostgreSQL: the registry's slow test starts a real server from it (initdb/pg_ctl, as the postgres user)
$(VENV)/.postgresql: | $(VENV)/bin/python
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql)
	touch $@

test-slow: $(STAMP) $(VENV)/.chromium $(VENV)/.debian $(VENV)/.postgresql
	$(PY) -m pytest -q -m slow -n $(TEST_WORKERS) --dist loadfile --durations=15

# Debian's Tesseract: presidio-image-redactor's OCR, the baseline of benchmarks/sanitize_throughput.py
# (which builds its own venv for presidio-image-redactor: it would break this one's OpenCV)
$(VENV)/.tesseract: | $(VENV)/bin/python
	command -v tesseract >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tesseract-ocr)
	touch $@

bench: $(STAMP) $(VENV)/.tesseract
	$(PY) benchmarks/step_time.py
	$(PY) benchmarks/demo_time.py
	$(PY) benchmarks/audit_throughput.py
	$(PY) benchmarks/extraction_memory.py
	$(PY) benchmarks/sanitize_quality.py
	$(PY) benchmarks/pii_quality.py
	$(PY) benchmarks/sanitize_throughput.py
	$(PY) benchmarks/aggregation_exactness.py
	$(PY) benchmarks/federated_accuracy.py
	$(PY) benchmarks/federated_membership.py
	$(PY) benchmarks/federated_cost.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs demo site
