# Quick start:  make demo   (set up .venv, pack the bundled sample, validate, stats, train, evaluate, plot, predict)
#               make test   (set up .venv with the test extras, run the test suite)
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo

.PHONY: demo test test-heavy venv clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test,openqdc,ase,hdf5]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(BIN)/python -m pytest -q

# the few end-to-end tests marked heavy (several training processes at once, or 30 s or more each); CI runs them after `make test`
test-heavy: venv
	$(BIN)/python -m pytest -q -m heavy

demo: venv
	rm -rf $(DEMO)
	mkdir -p $(DEMO)
	$(BIN)/packedqdc pack npz --sample $(DEMO)/sample
	$(BIN)/packedqdc validate --checksums $(DEMO)/sample
	$(BIN)/packedqdc stats $(DEMO)/sample --bucket-size 8192
	$(BIN)/packedqdc train --data-path $(DEMO)/sample --runs-dir $(DEMO)/runs --name demo \
		--features 64 --batch-size 16 --num-epochs 30 --max-time 150
	$(BIN)/packedqdc evaluate $(DEMO)/runs/demo --data-path $(DEMO)/sample --plot $(DEMO)/parity.png
	$(BIN)/packedqdc plot $(DEMO)/runs/demo --output $(DEMO)/curves.png
	$(BIN)/packedqdc predict $(DEMO)/runs/demo $(DEMO)/sample --output $(DEMO)/predictions.npz

clean:
	rm -rf $(VENV) $(DEMO) runs .pytest_cache
