# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo
# Rules call the `vesicleflow` command: make the virtualenv's one visible to Snakemake's jobs.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test venv bench bench-accuracy train lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[workflow,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vesicleflow simulate $(DEMO)/data --datasets 2 --tomograms 2 --shape 64 192 192 --seed 7
	$(BIN)/snakemake --profile profiles/local --config input_dir=$(DEMO)/data/tomograms output_dir=$(DEMO)/results
	@echo "Accuracy against the simulator's ground truth:"
	$(BIN)/vesicleflow evaluate $(DEMO)/results $(DEMO)/data/truth --min-f1 0.8
	@echo ""
	@echo "Results:   $(DEMO)/results/<dataset>/<tomogram>/vesicles.csv (+ labels.mrc)"
	@echo "Summary:   $(DEMO)/results/summary/ (per_tomogram.csv, per_dataset.csv, radius_distribution.png)"

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/snakemake --lint

clean:
	rm -rf demo results .snakemake
