# `make demo` runs the main job, `make test` the tests; both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
# The versions this project is developed and tested with (installed from the local disk here).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint docs bench demo small-model small-synthetic-model small-interactive-model \
	small-real-interactive-model \
	test-gpu mutation clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev,bench,video,docs,train,cutie,stcn,deploy]'
	touch $@

# The linter first (ruff.toml), then the tests in TEST_WORKERS processes (pytest-xdist; most
# tests are single-threaded Python under the Triton interpreter; conftest.py shares the cores
# out among the workers' torch threads; docs/testing.md has the times).
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: $(STAMP)
	$(PY) -m ruff check .

# The documentation site (docs/ and the API pages from the docstrings) into site/.
docs: $(STAMP)
	$(PY) -m mkdocs build --strict

bench: $(STAMP)
	$(PY) -m bench kernel

demo: $(STAMP)
	$(PY) -m stm_model.demo

# The DAVIS-2016 sequences the real-video small model trains on; the other ten of DAVIS-2016 val
# (blackswan, car-shadow, dance-twirl, dog, drift-straight, horsejump-high, libby,
# paragliding-launch, scooter-black, soapbox) are its test set: never trained or tuned on.
DAVIS2016 ?= ../shared/data/davis2016-val
DAVIS_TRAIN := bmx-trees breakdance camel car-roundabout cows drift-chicane goat kite-surf \
	motocross-jump parkour
SMALL_REAL_RUN ?= runs/small-real
# the encoders' ImageNet trunk of the shipped small-real and of its interactive variant
SMALL_REAL_TRUNK := efficientnet_lite1

# Reproduces stm_model/weights/stm_small_real.pt in two runs, resumable (the same command
# continues a stopped run). 1: EfficientNet-Lite1 encoders from ImageNet weights, static-image
# pre-training on the training sequences' frames, then their clips mixed with synthetic ones.
# 2: from run 1's weights (as exported in fp16), clips that are zoomed, flipped, recoloured and
# shaken (--augment), longer gaps between their frames, more synthetic clips.
small-model: $(STAMP)
	$(PY) -m stm_model.training.loop --output $(SMALL_REAL_RUN) --model small-real \
		--trunk $(SMALL_REAL_TRUNK) --data $(DAVIS2016) --sequences $(DAVIS_TRAIN) --steps 2000 \
		--static-steps 600 --batch-size 4 --clip-len 3 --clip-size 240 240 --max-objects 1 \
		--max-skip 1 10 5 --synthetic-ratio 0.2 --freeze-bn --lr 3e-4 --seed 0 --save-every 100 \
		--log-every 20
	$(PY) -m stm_model export $(SMALL_REAL_RUN)/model.pt $(SMALL_REAL_RUN)/model_fp16.pt \
		--dtype fp16
	$(PY) -m stm_model.training.loop --output $(SMALL_REAL_RUN)-augmented --model small-real \
		--trunk $(SMALL_REAL_TRUNK) --init-from $(SMALL_REAL_RUN)/model_fp16.pt \
		--data $(DAVIS2016) --sequences $(DAVIS_TRAIN) --steps 1800 --warmup-steps 50 \
		--batch-size 4 --clip-len 3 --clip-size 240 240 --max-objects 1 --max-skip 5 15 8 \
		--synthetic-ratio 0.3 --augment --freeze-bn --lr 2e-4 --seed 2 --save-every 100 \
		--log-every 20
	$(PY) -m stm_model export $(SMALL_REAL_RUN)-augmented/model.pt \
		stm_model/weights/stm_small_real.pt --dtype fp16

# Reproduces stm_model/weights/stm_small_real_interactive.pt, the interactive commands' default:
# small-real fine-tuned on synthesised scribbles over the same training sequences (22 minutes on
# a 2-core CPU; its robot rounds: docs/performance.md).
SMALL_REAL_INTERACTIVE_RUN ?= runs/small-real-interactive
small-real-interactive-model: $(STAMP)
	$(PY) -m stm_model.training.loop --output $(SMALL_REAL_INTERACTIVE_RUN) --model small-real \
		--trunk $(SMALL_REAL_TRUNK) --interactive --init-from stm_model/weights/stm_small_real.pt \
		--data $(DAVIS2016) --sequences $(DAVIS_TRAIN) --steps 500 --warmup-steps 20 \
		--batch-size 4 --clip-len 3 --clip-size 240 240 --max-objects 1 --max-skip 1 10 5 \
		--synthetic-ratio 0.2 --freeze-bn --lr 1e-4 --seed 1 --save-every 50 --log-every 10
	$(PY) -m stm_model export $(SMALL_REAL_INTERACTIVE_RUN)/model.pt \
		stm_model/weights/stm_small_real_interactive.pt --dtype fp16

# Reproduces stm_model/weights/stm_small_synthetic.pt (about 2 hours on a 2-core CPU).
small-synthetic-model: $(STAMP)
	$(PY) -m stm_model.training.loop --output runs/small --model small --steps 3600 \
		--static-steps 300 --batch-size 8 --clip-len 3 --size 128 128 --max-skip 1 25 8 \
		--lr 4e-4 --seed 0 --save-every 200 --log-every 20
	$(PY) -m stm_model export runs/small/model.pt stm_model/weights/stm_small_synthetic.pt \
		--dtype fp16

# The interactive variant, fine-tuned from the small model on synthesised scribbles.
small-interactive-model: $(STAMP)
	$(PY) -m stm_model.training.loop --output runs/small-interactive --model small --interactive \
		--init-from stm_model/weights/stm_small_synthetic.pt --steps 500 --warmup-steps 20 \
		--batch-size 8 --clip-len 3 --size 128 128 --max-skip 1 10 5 --lr 1e-4 --seed 1 \
		--save-every 50 --log-every 10
	$(PY) -m stm_model export runs/small-interactive/model.pt \
		stm_model/weights/stm_small_interactive.pt --dtype fp16

# Mutation testing with mutmut (docs/testing.md, "Mutation score"; not part of `make test` or CI):
# the committed code (HEAD) copied into MUTATION_DIR, its decorated functions rewritten so that
# mutmut mutates them (tools/mutation.py), mutmut run there with setup.cfg's [mutmut] section,
# the score per file printed and written to MUTATION_DIR/mutation.json and mutation.md.
# MUTANTS: mutant name globs to run only those (e.g. 'stm_kernels.backends.pytorch.x_backward*').
MUTATION_DIR ?= .mutation
MUTATION_CHILDREN ?= 2
MUTANTS ?=
MUTATED_DECORATED := stm_kernels/backends/pytorch.py stm_kernels/memory_read.py
mutation: $(STAMP)
	$(PY) -m pip install --quiet mutmut==3.8.1
	rm -rf $(MUTATION_DIR) && mkdir -p $(MUTATION_DIR)
	git archive HEAD | tar -x -C $(MUTATION_DIR)
	$(PY) tools/mutation.py prepare $(MUTATION_DIR) $(MUTATED_DECORATED)
	cd $(MUTATION_DIR) && $(abspath $(VENV))/bin/mutmut run --max-children $(MUTATION_CHILDREN) \
		$(MUTANTS)
	$(PY) tools/mutation.py report $(MUTATION_DIR) $(MUTATION_DIR)/mutation.json \
		$(MUTATION_DIR)/mutation.md

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) *.egg-info
