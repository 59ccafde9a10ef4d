PY ?= $(if $(VIRTUAL_ENV),python,.venv/bin/python)

.venv/bin/python:
	python3 -m venv .venv

install: $(if $(VIRTUAL_ENV),,.venv/bin/python)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"

test: install
	$(PY) -m pytest -q -n 2 tests

# Interim demo (until the R1 recipe replaces it): tiny DeepSeek-V3 on the embedded synthetic
# tasks, a progress bar, TensorBoard logs in runs/demo/tb. 2-4 minutes on 2 CPU cores (~1 compiling).
DEMO_STEPS ?= 60
demo: install
	rm -rf runs/demo
	$(PY) -m deepseek_jax.train --config configs/tiny_v3.py --workdir runs/demo \
		--config.total_steps=$(DEMO_STEPS) --config.optimizer.warmup_steps=5 \
		--config.log_every=5 --config.eval_every=20 --config.checkpoint_every=20
	@echo "metrics: runs/demo/metrics.jsonl   TensorBoard: tensorboard --logdir runs/demo/tb"

# Every benchmark in experiments/benchmarks/ in full mode, each writing its RESULTS.md section
# (never part of `make test`). GPU-only scripts (gpu_*.py) run only where jax sees a GPU.
bench: $(if $(VIRTUAL_ENV),,.venv/bin/python)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[bench]"
	@backend=$$($(PY) -c "import jax; print(jax.default_backend())"); \
	for f in experiments/benchmarks/*.py; do \
		case $$(basename $$f) in common.py) continue;; esac; \
		case $$(basename $$f) in gpu_*) if [ "$$backend" != gpu ]; then \
			echo "== $$f: skipped (jax backend is $$backend, not gpu)"; continue; fi;; esac; \
		echo "== $$f"; $(PY) $$f || exit 1; \
	done

.PHONY: install test demo bench
