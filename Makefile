# facenets: every command a user needs. `make install test` first, then `make demo`.
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   ?= data/fer2013
ARGS   ?=

.PHONY: install test demo emotion emotion-cpu monterrey bench clean

install:  ## create .venv and install facenets with its test extra
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'

test:  ## the whole suite (real-data tests run when FACENETS_DATA points at ../shared/data)
	$(PY) -m pytest

demo:  ## two-minute emotion run on built-in synthetic faces: a complete run folder, no download
	$(PY) train_emotion.py --data synthetic --model vgg --width 16 --epochs 4 --batch-size 64 --lr 0.05 $(ARGS)

emotion:  ## the recommended recipe on FER2013 (DATA=path to the image folders, .zip or fer2013.csv)
	$(PY) train_emotion.py --data $(DATA) $(ARGS)

emotion-cpu:  ## a recipe sized for a 2-core CPU: 65% PublicTest in 21-28 minutes
	$(PY) train_emotion.py --data $(DATA) --width 16 --crop 40 --tta tencrop --val-fraction 0 --epochs 40 $(ARGS)

monterrey:  ## Tec de Monterrey baseline, 10 epochs, its 20,099 / 2,151 split
	$(PY) train_emotion.py --data $(DATA) --model monterrey_baseline --split monterrey --optimizer adam --lr 1e-3 \
		--scheduler none --epochs 10 --batch-size 64 --no-augment --label-smoothing 0 --weight-decay 0 $(ARGS)

bench:  ## facenets' loop vs a DataLoader loop (images/s), then time to 70%/72% (DATA=synthetic ARGS=--small: 10 s CPU smoke)
	$(PY) benchmarks/bench_emotion.py --data $(DATA) $(ARGS)

clean:  ## remove the virtual environment and caches (run folders stay)
	rm -rf $(VENV) *.egg-info .pytest_cache
