PY ?= $(if $(VIRTUAL_ENV),python,.venv/bin/python)

.venv/bin/python:
	python3 -m venv .venv

install: $(if $(VIRTUAL_ENV),,.venv/bin/python)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"

test: install
	$(PY) -m pytest -q -n 2 tests

.PHONY: install test
