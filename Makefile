# The two commands of the README. Each finds or creates .venv (Python >= 3.12, JAX 0.11.2).
# If the environment cannot be made, ensure_env.sh says why and `false` fails the recipe.
PY = $(shell bash scripts/ensure_env.sh || echo false)

.PHONY: quickstart test
quickstart:
	$(PY) -m experiments.quickstart --config configs/quickstart.py $(ARGS)

test:
	$(PY) -m pytest -q $(ARGS)
