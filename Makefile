# Two commands for a fresh machine (no GPU, no download):
#   make demo   set up .venv and run the main job on the embedded default
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test test-all demo lint clean

$(STAMP): setup.py constraints/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned, so nothing else can drag in another build.
	$(PIP) install -q -c constraints/dev.txt torch torchvision
	$(PIP) install -q -c constraints/dev.txt -e ".[train,bags,dev]" \
		"ros-rclpy[fastrtps]" ros-std-msgs ros-sensor-msgs ros-lifecycle-msgs \
		colcon-common-extensions
	touch $(STAMP)

venv: $(STAMP)

# pytest exits 5 when nothing was collected; that is not a failure of the suite.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS); rc=$$?; \
		if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

demo: $(STAMP)
	$(VENV)/bin/lisa-demo --out demo_out

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build install log demo_out
