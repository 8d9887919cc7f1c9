# `make demo` runs the main job, `make test` the tests; both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
# The versions this project is developed and tested with (installed from the local disk here).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint docs bench demo small-model small-interactive-model test-gpu clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev,bench,video,docs]'
	touch $@

# The linter first (ruff.toml), then the tests.
test: lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

# The documentation site (docs/ and the API pages from the docstrings) into site/.
docs: $(STAMP)
	$(PY) -m mkdocs build --strict

bench: $(STAMP)
	$(PY) -m bench kernel

demo: $(STAMP)
	$(PY) -m stm_model.demo

# Reproduces stm_model/weights/stm_small_synthetic.pt (about 2 hours on a 2-core CPU).
small-model: $(STAMP)
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

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) *.egg-info
