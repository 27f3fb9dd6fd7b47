# Entry points (see README): `make demo` runs the main job, `make test` runs the test suite, `make study` runs the
# study of docs/results.md. All create the virtual environment from the pinned requirements first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-ray demo study study-report test test-slow test-ray test-tracking test-monailabel lint format zoo-check

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

# Optional: Ray in the same environment, for `python -m scripts.study run --executor ray` (docs/cluster.md) and its
# tests, which `make test` skips without it.
$(VENV)/.ray-installed: $(VENV)/.installed requirements-ray.txt
	$(PY) -m pip install --quiet -r requirements-ray.txt
	touch $@

setup-ray: $(VENV)/.ray-installed

# A small study (3D teacher, 2D student with and without KD over two seeds, SBR and always-PD baselines, the external
# sets) in eval/study-demo, two cells side by side; five to seven minutes on 2 CPU cores, setup included (README).
# Running it again resumes or reprints the table. Then the KD student and its teacher are published to models/
# (model.pt, teacher.pt) for the inference configs.
demo: setup
	$(PY) -m scripts.study run --matrix demo --jobs 2 --publish models

# The study of docs/results.md (the `cpu` matrix, hours on 2 CPU cores; resumable: run it again after an interruption),
# then its report and figures, and the results tables of README.md and docs/README.md.
study: setup
	$(PY) -m scripts.study run --matrix cpu --run-dir eval/study-cpu --jobs 2
	$(MAKE) study-report

study-report: setup
	$(PY) -m scripts.study report eval/study-cpu --out docs/results.md --figures docs/figures --tables README.md docs/README.md

# The suite runs on every core (pytest-xdist; a test file stays on one worker so that its module fixtures are built
# once), one torch thread per worker so that workers do not spin against each other; the 20 slowest tests are listed.
TEST_OPTS := -n auto --dist loadfile --durations 20

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(TEST_OPTS)

test-slow: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slow $(TEST_OPTS)

# The study's Ray executor and the cluster recipes of docs/cluster.md (also part of `make test` once Ray is installed).
test-ray: setup-ray
	$(PY) -m pytest -q tests/test_study_ray.py tests/test_study_ray_gpus.py tests/test_cluster_recipes.py

lint: setup
	$(VENV)/bin/ruff check scripts tests monailabel_app
	$(VENV)/bin/ruff format --check scripts tests monailabel_app

format: setup
	$(VENV)/bin/ruff format scripts tests monailabel_app
	$(VENV)/bin/ruff check --fix scripts tests monailabel_app

# Model-zoo readiness: the zoo's bundle verification, code-format tools and file checks on the bundle as a zoo
# submission (also part of `make test`). MODEL_ZOO_DIR=<model-zoo checkout> also runs the zoo's own verify_bundle.py.
zoo-check: setup
	$(PY) -m pytest -q tests/test_zoo.py

# Opt-in: MLflow tracking test in its own environment (mlflow-skinny and SQLAlchemy).
.venv-tracking/.installed: requirements-dev.txt requirements-tracking.txt
	$(PYTHON) -m venv .venv-tracking
	.venv-tracking/bin/python -m pip install --quiet -r requirements-dev.txt -r requirements-tracking.txt
	touch $@

test-tracking: .venv-tracking/.installed
	.venv-tracking/bin/python -m pytest -q tests/test_distribution.py -k mlflow

# MONAI Label server test in its own environment (.venv-monailabel; see docs/monailabel.md).
test-monailabel:
	bash tests/monailabel/run.sh
