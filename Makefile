# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo
# Rules call the `vesicleflow` command: make the virtualenv's one visible to Snakemake's jobs.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test venv bench bench-accuracy bench-shifted train lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[workflow,test,curate]'
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

bench: $(STAMP)
	$(BIN)/vesicleflow bench --out bench/perf

ACCURACY := bench/accuracy
bench-accuracy: $(STAMP)
	$(BIN)/vesicleflow accuracy-suite $(ACCURACY)/data
	$(BIN)/snakemake --profile profiles/local --config input_dir=$(ACCURACY)/data/tomograms output_dir=$(ACCURACY)/results
	$(BIN)/vesicleflow evaluate $(ACCURACY)/results $(ACCURACY)/data/truth --by-dataset --json-out $(ACCURACY)/accuracy.json

# Robustness: the same workflow on conditions outside the simulator's defaults (README, "Accuracy").
SHIFTED := bench/shifted
bench-shifted: $(STAMP)
	$(BIN)/vesicleflow accuracy-suite $(SHIFTED)/data --shifted --tomograms-per-case 2
	$(BIN)/snakemake --profile profiles/local --config input_dir=$(SHIFTED)/data/tomograms output_dir=$(SHIFTED)/results
	$(BIN)/vesicleflow evaluate $(SHIFTED)/results $(SHIFTED)/data/truth --by-dataset --json-out $(SHIFTED)/accuracy.json

# Retrain the bundled model's recipe into models/trained (see README, "The model").
TRAIN_DATA := build/train-data
train: $(STAMP)
	$(BIN)/vesicleflow simulate $(TRAIN_DATA)/a --datasets 6 --tomograms 4 --shape 64 192 192 --seed 1000
	$(BIN)/vesicleflow simulate $(TRAIN_DATA)/b --datasets 8 --tomograms 3 --shape 64 192 192 --seed 2000 \
		--voxel-size-nm 1.0 --voxel-size-nm 1.2 --voxel-size-nm 1.4 --voxel-size-nm 1.7 \
		--voxel-size-nm 2.0 --voxel-size-nm 2.3 --voxel-size-nm 2.6 --voxel-size-nm 2.8
	$(BIN)/vesicleflow train $(TRAIN_DATA)/a -o models/stage1 --epochs 17 --steps-per-epoch 40 --learning-rate 3e-3
	$(BIN)/vesicleflow train $(TRAIN_DATA)/a $(TRAIN_DATA)/b -o models/stage2 --init models/stage1 \
		--epochs 16 --steps-per-epoch 40 --learning-rate 1.5e-3 --seed 1
	$(BIN)/vesicleflow training-set $(TRAIN_DATA)/c --tomograms 60 --seed 31
	$(BIN)/vesicleflow train $(TRAIN_DATA)/a $(TRAIN_DATA)/c -o models/trained --init models/stage2 \
		--epochs 30 --steps-per-epoch 50 --learning-rate 1e-3 --seed 3

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/snakemake --lint

clean:
	rm -rf demo results .snakemake
