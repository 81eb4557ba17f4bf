# poisonbench: every target installs into .venv first when it is missing.
VENV   := .venv
PY     := $(VENV)/bin/python
PB     := $(VENV)/bin/poisonbench
# Never take the machine's local CPU-only torch wheel: PyPI's torchvision needs PyPI's torch.
PIP    := PIP_FIND_LINKS= $(VENV)/bin/pip
SMOKE  := .smoke

.PHONY: install test demo demo-full smoke pretrain-digits leaderboards bench clean \
        table1 table2 table3 table4 table5 table6 table7 fig2 fig5 fig6 fig7 \
        robuster-table1 robuster-table2 robuster-table3 robuster-fig3 robuster-sec5_4 \
        demo-digits-integrity demo-digits-integrity-defenses

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -e ".[dev]"
	touch $@

test: install
	$(PY) -m pytest -q

# Worker processes for the demo targets (`poisonbench run --jobs-per-device`): auto is one
# per core on a CPU. Results do not depend on it: every CPU job runs with one thread.
JOBS ?= auto

# A newcomer's first contact, each paper's headline finding on the embedded digits in a
# few minutes on two cores: availability poisons (demo/digits) and a backdoor undone by
# adversarial poisoning (the backdoor row of demo/digits-integrity, 8 of its 20 trials).
demo: install
	$(PB) run --table demo/digits --jobs-per-device $(JOBS)
	$(PB) run --table demo/digits-integrity --rows backdoor_patch --trials 8 --jobs-per-device $(JOBS)

# Every digits table of the demo suite (separability probes, defenses) in full.
demo-full: install
	$(PB) run --suite demo --jobs-per-device $(JOBS)

# The cpu profile's feature extractor (demo/digits-defenses): SimCLR on the digits
# `aux` split, which is disjoint from the training split. Skipped when it exists; the
# first job that needs it makes the same file otherwise (cpu profile: `pretrain:`).
pretrain-digits: install
	$(PB) pretrain simclr --dataset digits --model small_cnn --model-param pool=1 --if-missing

smoke: install
	rm -rf $(SMOKE)
	POISONBENCH_HOME=$(SMOKE)/home $(PB) data fixtures --data-root $(SMOKE)/data
	POISONBENCH_HOME=$(SMOKE)/home $(PB) run --suite all --fast-dev-run --data-root $(SMOKE)/data
	rm -rf $(SMOKE)

# One target per table or figure of the shortcuts paper (profile paper: CIFAR and a
# GPU); add PROFILE=cpu to run the same table on the embedded digits.
PROFILE ?=
PROFILE_ARG := $(if $(PROFILE),--profile $(PROFILE),)
table1 table2 table3 table4 table5 table6 table7 fig2 fig5 fig6 fig7: install
	$(PB) run --table shortcuts/$@ $(PROFILE_ARG)

# The robuster paper's tables: make robuster-table1 runs robuster/table1 (PROFILE=cpu too).
robuster-table1 robuster-table2 robuster-table3 robuster-fig3 robuster-sec5_4: install
	$(PB) run --table robuster/$(patsubst robuster-%,%,$@) $(PROFILE_ARG)

# The digits tables outside the quick demo suite (cpu profile, 20 paired trials each):
# make demo-digits-integrity-defenses runs demo/digits-integrity-defenses.
demo-digits-integrity demo-digits-integrity-defenses: install
	$(PB) run --table demo/$(patsubst demo-%,%,$@)

leaderboards: install
	$(PB) leaderboard

bench: install
	$(PY) -m poisonbench.bench.speed

clean:
	rm -rf $(VENV) $(SMOKE) build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
