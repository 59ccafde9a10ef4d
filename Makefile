PY ?= $(if $(VIRTUAL_ENV),python,.venv/bin/python)

.venv/bin/python:
	python3 -m venv .venv

install: $(if $(VIRTUAL_ENV),,.venv/bin/python)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

# The miniature R1 recipe on the embedded arithmetic tasks: pretrain -> cold-start SFT -> GRPO
# -> rejection sampling -> a dense student; prints the before/after table and writes
# runs/demo/summary.json and runs/demo/reward_curve.png. Finished stages are skipped on a rerun
# (rm -rf runs/demo to start over). About 19 minutes on 2 CPU cores, the install included.
demo: install
	$(PY) experiments/r1_pipeline.py --workdir runs/demo

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
