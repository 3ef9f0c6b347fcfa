# MedVAR bundle: `make demo` runs the main job on the demo data, `make test` runs the test suite.
# Everything is installed into .venv from the project's own pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= runs/demo
WORKERS ?= 2
# tokenizer: 1500 autoencoder warm-up steps on 128² crops, 1000 quantized steps on 128² crops (each with
# the crop's scale schedule), then 200 quantized steps on whole slices, codes learnt by online k-means
# (docs/tokenizer.md, "Levers"). TOKENIZER_TIMES=N multiplies the three step counts: 3 gave 26.69 dB held out
# instead of 26.0 and every group with more than one held-out slice over the 26 dB floor (MR leg 26.01) in a
# 19-minute tokenizer against about 8; 4 gave 26.78 dB (MR leg 26.17) in a 37-minute demo in a fresh clone,
# against 18 (docs/tokenizer.md, "Four times the steps"); on the 19-volume corpus 4 left MR leg at 25.98 and 5 gave
# 26.08 (all 26.81) in a 23-minute tokenizer against 5 (docs/tokenizer.md, "Five times the steps")
TOKENIZER_TIMES ?= 1
tokenizer_steps = $(if $(shell echo '$(TOKENIZER_TIMES)' | grep -xE '[1-9][0-9]*'),$(shell expr $(1) \* $(TOKENIZER_TIMES)),$\
	$(error TOKENIZER_TIMES must be a positive whole number, got '$(TOKENIZER_TIMES)'))
TOKENIZER_WARMUP ?= $(call tokenizer_steps,1500)
TOKENIZER_CROP_STEPS ?= $(call tokenizer_steps,1000)
TOKENIZER_STEPS ?= $(call tokenizer_steps,2700)
# transformer: tiny preset, batch 8, peak LR 3e-3 (--lr is per 256 images: 0.096 x 8/256)
TRANSFORMER_STEPS ?= 250
SAMPLES ?= 16
# MedVAR's classifier-free guidance in the demo and compare: 1 for the tiny preset after minutes of training (`medvar
# ablate`, 3 seeds, 7 datasets: mean structure FD 193/119/127 at 5/15/30 min of training against 210/166/200 with
# the paper's 4, docs/evaluation.md); `medvar generate` without --cfg keeps configs/inference.yaml's 4 (paper Table 4, d16)
CFG ?= 1
# MedVAR's softmax temperature in the demo and compare: 0.6 for the tiny preset after minutes of training (`medvar
# ablate`, 2 seeds, the 5/15/30-minute models of a compare run: mean structure FD 132.5/99.9/74.4 against
# 194.8/112.3/94.0 at 1, at the price of diversity: MS-SSIM +0.06 to +0.12; docs/evaluation.md); `medvar generate`
# without --temperature keeps configs/inference.yaml's 1 (VAR)
TEMPERATURE ?= 0.6
# ...falling linearly over the scales to FINAL_TEMPERATURE at the last one (empty: TEMPERATURE at every scale): the
# finest scales' codes are drawn near the transformer's most likely ones, the layout keeps its diversity (`medvar
# ablate`, 2 seeds, 7 datasets: mean structure FD of the demo's model 163.1 -> 149.9, with TOKENIZER_TIMES=3 120.1 ->
# 98.8, of a 750-step one 105.7 -> 102.6; docs/evaluation.md); `medvar generate` without --final-temperature keeps it
# constant
FINAL_TEMPERATURE ?= 0.2
final_temperature = $(if $(FINAL_TEMPERATURE),--final-temperature $(FINAL_TEMPERATURE))
# compare: MedVAR and the DDPM baseline trained through these cumulative wall-clock budgets (minutes),
# sampled and scored at each: the quality-vs-training-time curve (docs/evaluation.md)
COMPARE_MINUTES ?= 5 15 30
COMPARE_NUM ?= 32
DDPM_STEPS ?= 10 20 30 50 100
DDPM_NUM ?= 2
DDPM_MINUTES ?= 40
# seed of both trainings and of their samples: a second run with another seed gives the curve's run-to-run spread
# (its own folder, $(DEMO)/compare_seedN; seed 0 writes $(DEMO)/compare)
COMPARE_SEED ?= 0

.PHONY: install demo test bench compare bundle clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/medvar demo-data --out $(DEMO)/data
	$(BIN)/medvar prepare --datalist $(DEMO)/data/datalist.json --out $(DEMO)/store --workers $(WORKERS)
	$(BIN)/medvar preview --store $(DEMO)/store --out $(DEMO)/store_preview.png
	$(BIN)/medvar train-tokenizer --store $(DEMO)/store --out $(DEMO)/tokenizer --max-steps $(TOKENIZER_STEPS) \
		--batch-size 4 --lr 1e-3 --min-lr-ratio 0.05 --augment --ae-warmup $(TOKENIZER_WARMUP) --warmup-crop 128 \
		--quantized-crop-steps $(TOKENIZER_CROP_STEPS) --codebook-decay 0.99 --dead-code-every 25 --val-every 1200 \
		--checkpoint-every 100
	@# written to a .part file and renamed, so a failed evaluation stops the demo and leaves no broken file
	$(BIN)/medvar evaluate-tokenizer --tokenizer $(DEMO)/tokenizer/tokenizer.pt --store $(DEMO)/store \
		--split validation --by-group --quiet > $(DEMO)/tokenizer/heldout_metrics.json.part
	mv $(DEMO)/tokenizer/heldout_metrics.json.part $(DEMO)/tokenizer/heldout_metrics.json
	cat $(DEMO)/tokenizer/heldout_metrics.json
	$(BIN)/medvar tokenize --tokenizer $(DEMO)/tokenizer/tokenizer.pt --store $(DEMO)/store --force
	$(BIN)/medvar train --store $(DEMO)/store --tokenizer $(DEMO)/tokenizer/tokenizer.pt --out $(DEMO)/transformer \
		--preset tiny --max-steps $(TRANSFORMER_STEPS) --batch-size 8 --lr 0.096 --warmup 20 --val-every 125 --checkpoint-every 50
	$(BIN)/medvar generate --model $(DEMO)/transformer/model.pt --num $(SAMPLES) --out $(DEMO)/samples --progression --cfg $(CFG) \
		--temperature $(TEMPERATURE) $(final_temperature)
	@echo "demo: store $(DEMO)/store (preview $(DEMO)/store_preview.png);"
	@echo "      tokenizer $(DEMO)/tokenizer/tokenizer.pt"
	@echo "      held-out tokenizer metrics $(DEMO)/tokenizer/heldout_metrics.json, pictures in $(DEMO)/tokenizer/validation/"
	@echo "      model (tokenizer + transformer + dataset registry, all generation needs): $(DEMO)/transformer/model.pt"
	@echo "      synthetic slices: NIfTI stacks and PNG grids in $(DEMO)/samples/"

test: install
	$(BIN)/ruff check --output-format concise .
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python scripts/bench_prepare.py
	$(BIN)/python scripts/bench_tokenizer.py
	$(BIN)/python scripts/bench_sampler.py

# the structure network the comparison scores with (STORE/structure.pt) is trained first when missing
compare: install
	@# the structure network is trained when the store has none that loads (missing, or of an older version)
	$(BIN)/python -c "from medvar_bundle.metrics import load_structure_net; load_structure_net(None, '$(DEMO)/store')" \
		2>/dev/null || $(BIN)/medvar train-structure --store $(DEMO)/store --quiet
	$(BIN)/python scripts/compare.py --store $(DEMO)/store --tokenizer $(DEMO)/tokenizer/tokenizer.pt --out $(DEMO)/compare$(if $(filter-out 0,$(COMPARE_SEED)),_seed$(COMPARE_SEED)) --cfg $(CFG) \
		--temperature $(TEMPERATURE) $(final_temperature) \
		--minutes $(COMPARE_MINUTES) --num $(COMPARE_NUM) --ddpm-steps $(DDPM_STEPS) --ddpm-num $(DDPM_NUM) \
		--ddpm-minutes $(DDPM_MINUTES) --seed $(COMPARE_SEED) --parallel

# the model-zoo zip (configs, models, docs, LICENSE, large_files.yml, package code); MODELS=DIR adds its weights
bundle: install
	$(BIN)/python scripts/make_bundle.py --out dist/medvar_bundle.zip $(if $(MODELS),--models $(MODELS))

clean-demo:
	rm -rf $(DEMO)
