# Set-up is idempotent: each target creates .venv when missing and installs what it needs.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.qtrain-installed
DATADIR := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-slow lint bench bench-int8 venv data clean

$(PY):
	python3 -m venv .venv

# torch first, pinned: the CPU build on local disk. An unpinned torch would pull a CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

data:
	@if [ ! -f $(DATADIR)/train-images-idx3-ubyte.gz ] && [ ! -f $(DATADIR)/train-images-idx3-ubyte ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
		(sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist); \
	fi

# The recipes on Fashion-MNIST: ResNet-9 width 16, 2 epochs on a 10k training subset, the full
# 10k test set. Sized for < 10 min on 2 CPU cores. amp-fp16 is left out: CPU torch's fp16
# convolution backward has no fast kernel (measured: ~10x an fp32 step on an AMD Zen 5, ~100x
# on an Intel Xeon with avx512_fp16, where it alone would take ~30 min); run it with
# `qtrain compare --recipes amp-fp16 ...` where that is acceptable, or on a GPU.
demo: venv data
	.venv/bin/qtrain compare --recipes fp32,amp-bf16,sbm8 --model resnet9 \
		--data fashion-mnist --width 16 --epochs 2 --train-subset 10000 --seeds 0 \
		--out runs/demo --overwrite

test: venv data
	$(PY) -m pytest -q

test-slow: venv data
	$(PY) -m pytest -q -m slow

lint: venv
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks

bench: venv data
	$(PY) benchmarks/bench_quantize.py
	$(PY) benchmarks/bench_train_step.py --isolated 7 --trainer \
		--out benchmarks/results/train_step_trainer.json
	$(PY) benchmarks/bench_layers.py
	$(PY) benchmarks/bench_memory.py --channels-last

# Training steps on this CPU's low-precision units (issue 23; docs/BENCHMARKS.md): every int8
# route against fp32 and amp-bf16 of the same run, the CPU's model and flags in the JSON; then
# `qtrain train`'s epoch time per recipe (ResNet-9 w64, 5,120 images) into <INT8_OUT>_epoch.json.
# On a machine with AMX: make bench-int8 INT8_OUT=benchmarks/results/lowp_gemm_amx.json
INT8_OUT ?= benchmarks/results/lowp_gemm_cpu.json
INT8_RECIPES := fp32,amp-bf16,int8-real,int8-real-bf16,int8-twin,ui8-float,ui8-int8-real,$\
	sbm8-float,sbm8-int8-real,qat-float,qat-int8-real
bench-int8: venv data
	$(PY) benchmarks/bench_lowp_gemm.py --models mlp,gpt,resnet9-w16,resnet9-w64 --rounds 5 \
		--recipes $(INT8_RECIPES) --out $(INT8_OUT)
	$(PY) benchmarks/bench_epoch.py --out $(basename $(INT8_OUT))_epoch.json

clean:
	rm -rf .venv build src/*.egg-info
