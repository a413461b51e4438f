# The two commands of the README. Each finds or creates .venv (Python >= 3.12, JAX 0.11.2).
PY = $(shell bash scripts/ensure_env.sh)

.PHONY: quickstart test
quickstart:
	$(PY) -m experiments.quickstart --config configs/quickstart.py $(ARGS)

test:
	$(PY) -m pytest -q $(ARGS)
