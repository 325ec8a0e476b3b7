# facenets: every command a user needs. `make install test` first, then `make demo`.
VENV   := .venv
PY     := $(VENV)/bin/python
ARGS   ?=
# DATA names the data set; each target has its own default
FER    = $(or $(DATA),data/fer2013)
UTK    = $(or $(DATA),data/UTKFace)
CELEBA = $(or $(DATA),data/celeba)
FACES  = $(or $(DATA),data/celeba-faces)

.PHONY: help install test lint demo emotion emotion-cpu monterrey bench ablation utkface utec concepcion attributes gan gan-cpu dcgan-concepcion gpu-evidence gpu-suite gpu-pack clean

help:  ## list every target with what it does (the default)
	@awk -F ':.*## ' '/^[a-z-]+:.*## / {printf "  %-17s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install:  ## create .venv and install facenets with its test extra
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'

test:  ## the whole suite (real-data tests run when FACENETS_DATA points at ../shared/data)
	$(PY) -m pytest

lint:  ## ruff: the code as formatted, lines of at most 120 characters, no unused names
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo:  ## half-minute emotion run on built-in synthetic faces: a complete run folder, no download
	$(PY) train_emotion.py --data synthetic --model vgg --width 16 --epochs 4 --batch-size 64 --lr 0.05 $(ARGS)

emotion:  ## the recipe on FER2013 (DATA=image folders, .zip or fer2013.csv): 71.1% PublicTest, 36 s training on an H100
	$(PY) train_emotion.py --data $(FER) --compile $(ARGS)

emotion-cpu:  ## a recipe sized for a 2-core CPU: 64.4% PublicTest in 24-25 minutes
	$(PY) train_emotion.py --data $(FER) --width 16 --epochs 30 --batch-size 128 --lr 0.1 --rotate 10 --zoom 0.1 \
		--translate 0.1 --erasing 0 --mixup 0 --ema 0 $(ARGS)

monterrey:  ## Tec de Monterrey baseline, 10 epochs, its 20,099 / 2,151 split
	$(PY) train_emotion.py --data $(FER) --model monterrey_baseline --split monterrey --optimizer adam --lr 1e-3 \
		--scheduler none --epochs 10 --batch-size 64 --no-augment --crop 0 --tta none --ema 0 --label-smoothing 0 \
		--weight-decay 0 $(ARGS)

bench:  ## facenets' loop vs a DataLoader loop (images/s), then time to 70%/72% (ARGS=--compile on a GPU; --small: CPU smoke)
	$(PY) benchmarks/bench_emotion.py --data $(FER) $(ARGS)

ablation:  ## what each part of the recipe is worth: 6 variants x 2 seeds, 4 at a time (H100, ARGS="-- --compile": 11 min)
	$(PY) benchmarks/ablate_emotion.py --data $(FER) --parallel 4 $(ARGS)

utkface:  ## facenets' multi-head net on UTKFace (DATA=its folder): gender 87.9%, age group 81.3%, age MAE 4.3 years, 15 min on 2 cores with AMX (bf16: for CPUs with AMX or AVX-512 BF16; on others add ARGS="--precision fp32")
	$(PY) train_attributes.py --data $(UTK) --width 32 --ema 0.999 --label-smoothing 0.1 --epochs 50 --precision bf16 $(ARGS)

utec:  ## the UTEC report's Arch 2 on UTKFace: gender and age group, Adam 1e-3: 83.1% / 69.2%, 11 min on 2 cores
	$(PY) train_attributes.py --data $(UTK) --preset utec $(ARGS)

concepcion:  ## the Concepción classifier on CelebA (DATA=its folder), one model per attribute as the report did
	for attribute in Male Eyeglasses Smiling; do \
		$(PY) train_attributes.py --data $(CELEBA) --preset concepcion --attrs $$attribute --name concepcion-$$attribute $(ARGS) || exit 1; \
	done

attributes:  ## facenets' net on all forty CelebA attributes at once, on CelebA's official partitions
	$(PY) train_attributes.py --data $(CELEBA) --image-size 64 $(ARGS)

gan:  ## the GAN recipe on face images (DATA=a folder or .zip of faces, CelebA's img_align_celeba too)
	$(PY) train_gan.py --data $(FACES) $(ARGS)

gan-cpu:  ## the recipe sized for a 2-core CPU: a narrower DCGAN for 45 minutes of training, bf16 (for CPUs with AMX or AVX-512 BF16; on others add ARGS="--precision fp32")
	$(PY) train_gan.py --data $(FACES) --width 32 --time-budget 45 --precision bf16 $(ARGS)

dcgan-concepcion:  ## the Concepción report's Keras DCGAN exactly: BCE, Adam 1e-4, batch 32, 30 epochs
	$(PY) train_gan.py --data $(FACES) --preset concepcion $(ARGS)

gpu-evidence:  ## on one GPU in ~9 min: the recipe x 3 seeds, --ensemble 4 and 8, one distilled net, the bench; a Markdown table
	$(PY) benchmarks/gpu_evidence.py --data $(FER) $(ARGS)

gpu-suite:  ## every script on one GPU in parts of <= 7.5 min (ARGS="--part smoke|emotion|attributes|gan|reports", "--pack FILE"; --small: every part on CPU, under a minute on 2 cores)
	$(PY) benchmarks/gpu_suite.py --data $(or $(DATA),data) $(ARGS)

gpu-pack:  ## one .tar.gz per data set for gpu-suite's --pack, each <= 58 MiB, into .data/ (DATA=a folder holding fer2013/, utkface/, celeba-faces/)
	$(PY) benchmarks/gpu_pack.py --data $(or $(DATA),data) $(ARGS)

clean:  ## remove the virtual environment and caches (run folders stay)
	rm -rf $(VENV) *.egg-info .pytest_cache
