"""Table specs, profiles, suites and job expansion: every table present loads and
expands; hashes and seeds depend on ids, not on order; errors name what is wrong."""
from __future__ import annotations

import dataclasses
import json
import textwrap

import pytest

from poisonbench import config
from poisonbench.bench import jobs as jobs_mod
from poisonbench.bench.jobs import derive_seed, expand, job_hash, job_state, read_result, read_results
from poisonbench.schema.result import RESULT_FORMAT_VERSION
from poisonbench.bench.catalogue import load_catalogue, load_suite, profile_names, table_ids
from poisonbench.bench.profiles import load_profile
from poisonbench.bench.tables import load_table
from poisonbench.schema.job_config import DEFAULTS, OPTIONAL
from poisonbench.bench.aggregate import aggregate
from poisonbench.errors import ConfigError, JobError, UnknownNameError

JOB_KEYS = {"table", "row", "column", "trial", "seed", "poison_seed", "profile", "fast_dev_run", *DEFAULTS}


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


MINIMAL = """\
    id: demo/mini
    paper: demo
    title: mini
    profile: cpu
    trials: 2
    columns:
      - {id: a, name: A}
      - {id: b, name: B, set: {dataset: svhn}}
    rows:
      - {id: r1, set: {attack: none}, reference: {a: 1.0}}
      - {id: r2, set: {attack: random_noise, attack_params: {eps: 0.03}}}
"""


def mini(tmp_path, text=MINIMAL):
    return load_table(write(tmp_path / "mini.yaml", text))


# --------------------------------------------------------------------------- every table


@pytest.mark.parametrize("table", table_ids())
def test_every_table_loads_and_expands(table):
    spec = load_table(table)
    cells = spec.cells()
    assert len(cells) == len(spec.rows) * len([c for c in spec.columns if not c.best_of])
    assert [(c.row, c.column) for c in cells] == [(r.id, c.id) for r in spec.rows for c in spec.columns if not c.best_of]
    jobs = expand(spec)
    assert len(jobs) == len(cells) * spec.trials
    assert len({j.hash for j in jobs}) == len(jobs)
    assert [j.hash for j in expand(load_table(table))] == [j.hash for j in jobs]  # stable
    for job in jobs:
        assert JOB_KEYS <= set(job.config) <= JOB_KEYS | set(OPTIONAL)
        assert set(job.config["train"]) == set(DEFAULTS["train"])
        assert job.hash == job_hash(job.config)
        assert 0 <= job.config["seed"] <= 2**31 - 1
    # Every profile that has the table's family expands it too.
    for name in profile_names():
        if spec.paper in load_profile(name).families:
            assert len(expand(spec, profile=name, trials=1)) == len(cells)


def test_the_brief_tables_are_present():
    assert {"demo/digits", "shortcuts/table3", "shortcuts/fig7"} <= set(table_ids())
    assert {"cpu", "paper", "quick"} <= set(profile_names())
    assert load_suite("demo") == ["demo/digits", "demo/digits-separability", "demo/digits-defenses"]
    assert load_suite("all") == table_ids()


def test_table3_references_are_the_papers():
    spec = load_table("shortcuts/table3")
    ref = {(c.row, c.column): c.reference for c in spec.cells()}
    assert ref["vgg11", "svhn_syn"] == 18.1
    assert ref["resnet18", "cifar10_clean"] == 94.7
    assert ref["densenet121", "cifar100_syn"] == 7.6
    assert None not in ref.values()
    assert spec.trials == 20 and spec.poison_seed == "fixed" and spec.profile == "paper"


def test_catalogue_covers_tables_md():
    ids = [e.id for e in load_catalogue().tables]
    expected = [f"shortcuts/table{i}" for i in range(1, 8)] + ["shortcuts/fig2", "shortcuts/fig5", "shortcuts/fig7"]
    expected += [f"robuster/table{i}" for i in range(1, 4)] + ["robuster/fig3", "robuster/sec5_4"]
    assert set(expected) <= set(ids)


# --------------------------------------------------------------------------- seeds and hashes


def test_seeds_and_hashes_come_from_ids_not_order():
    spec = load_table("shortcuts/table3")
    full = {(j.row, j.column, j.trial): j for j in expand(spec, trials=3)}
    some = expand(spec, trials=2, rows=["densenet121", "vgg11"])
    assert {j.row for j in some} == {"vgg11", "densenet121"}
    assert [j.row for j in some][0] == "vgg11"  # spec order, not the order asked
    for job in some:
        other = full[job.row, job.column, job.trial]
        assert (job.hash, job.config["seed"]) == (other.hash, other.config["seed"])
    assert len({j.config["seed"] for j in full.values()}) == len(full)


def test_fixed_and_per_trial_poison_seeds():
    spec = load_table("demo/digits")
    assert spec.poison_seed == "fixed"
    fixed = expand(spec)
    assert {j.config["poison_seed"] for j in fixed} == {derive_seed(spec.paper, "poison")}
    per_trial = expand(dataclasses.replace(spec, poison_seed="per_trial"))
    # Paired: trial k of every row draws the same target and init; trials differ.
    by_trial = {}
    for job in per_trial:
        by_trial.setdefault(job.trial, set()).add((job.config["poison_seed"], job.config["seed"]))
    assert all(len(seeds) == 1 for seeds in by_trial.values()) and len(by_trial) == spec.trials
    assert len({next(iter(seeds)) for seeds in by_trial.values()}) == spec.trials
    assert per_trial[0].config["poison_seed"] == derive_seed(spec.paper, "trial", 0)


def test_derive_seed_and_fast_dev_run():
    assert derive_seed("a", "b") == derive_seed("a", "b") != derive_seed("ab", "")
    assert all(0 <= derive_seed("t", i) <= 2**31 - 1 for i in range(100))
    spec = load_table("demo/digits")
    normal, fast = expand(spec, trials=1), expand(spec, trials=1, fast_dev_run=True)
    assert all(f.config["fast_dev_run"] for f in fast)
    assert {j.hash for j in normal}.isdisjoint(j.hash for j in fast)


def test_expand_rejects_unknown_rows_and_bad_trials():
    spec = load_table("demo/digits")
    with pytest.raises(ConfigError, match="no row 'synthtic' \\(did you mean 'synthetic'\\?\\); rows: none, random_noise, synthetic"):
        expand(spec, rows=["synthtic"])
    with pytest.raises(ConfigError, match="positive integer"):
        expand(spec, trials=0)


# --------------------------------------------------------------------------- profiles


def test_profile_cpu_overrides_dataset_and_model():
    cells = load_table("shortcuts/table3").cells("cpu")
    assert {c.config["dataset"] for c in cells} == {"digits"}
    assert {c.config["model"] for c in cells} == {"small_cnn"}
    profile = load_profile("cpu").family("shortcuts")
    assert {c.config["train"]["epochs"] for c in cells} == {profile.train["epochs"]}
    assert all(c.config["model_params"] == dict(profile.override["model_params"]) for c in cells)
    syn = [c for c in cells if c.column == "cifar10_syn"][0]
    assert syn.config["attack"] == "synthetic" and syn.config["attack_params"]["patch"] == 8


def test_lr_by_model_under_paper():
    cells = load_table("shortcuts/table3").cells("paper")
    lrs = {c.row: c.config["train"]["lr"] for c in cells}
    assert lrs == {"vgg11": 0.01, "resnet18": 0.1, "resnet50": 0.1, "densenet121": 0.1}
    robuster = load_profile("paper").family("robuster").train
    assert robuster["nesterov"] is True and robuster["milestones"] == [15, 25, 35]


def test_changing_a_name_resets_its_params(tmp_path):
    spec = mini(tmp_path, MINIMAL.replace(
        "title: mini", "title: mini\n    defaults: {attack: synthetic, attack_params: {patch: 4}, "
        "model: vgg11, model_params: {width: 2}}"))
    by_row = {c.row: c for c in spec.cells("cpu")}
    assert by_row["r1"].config["attack_params"] == {}  # attack none: synthetic's params dropped
    assert by_row["r2"].config["attack_params"] == {"eps": 0.03}
    # cpu overrides to small_cnn with its own params: VGG's width is dropped
    assert by_row["r1"].config["model_params"] == {"pool": 1}


def test_missing_family_is_an_error(tmp_path):
    spec = mini(tmp_path, MINIMAL.replace("paper: demo", "paper: nopaper").replace("demo/mini", "nopaper/mini"))
    with pytest.raises(ConfigError, match="profile 'cpu' has no family 'nopaper'"):
        spec.cells()


# --------------------------------------------------------------------------- strict specs


@pytest.mark.parametrize("change, named", [
    (("title: mini", "titel: mini"), "'titel'"),
    (("{id: r1, set: {attack: none}", "{id: r1, set: {atack: none}"), "'atack'"),
    (("{id: r1, set:", "{id: r1, nmae: x, set:"), "'nmae'"),
    (("profile: cpu", "profile: cpu\n    defaults: {train: {epoch: 3}}"), "'epoch'"),
    (("{id: b, name: B, set: {dataset: svhn}}", "{id: b, name: B, set: {datset: svhn}}"), "'datset'"),
])
def test_unknown_keys_are_named(tmp_path, change, named):
    with pytest.raises(ConfigError, match=f"unknown key {named}"):
        mini(tmp_path, MINIMAL.replace(*change))


def test_unknown_key_error_suggests_and_lists():
    with pytest.raises(ConfigError) as e:
        config.check_keys({"lrr": 1}, ["lr", "epochs"], "table x train")
    assert str(e.value) == "unknown key 'lrr' in table x train (did you mean 'lr'?); allowed: lr, epochs"


@pytest.mark.parametrize("change, message", [
    (("{id: r2,", "{id: r1,"), "row id 'r1' appears twice"),
    (("reference: {a: 1.0}", "reference: {c: 1.0}"), "names column 'c'"),
    (("reference: {a: 1.0}", "reference: 1.0"), "must map column ids"),
    (("set: {attack: none}", "set: {attack: {name: none}}"), "attack in .* must be a string"),
    (("set: {attack: none}", "set: {ratio: 2}"), r"ratio in .* must lie in \[0, 1\]"),
    (("set: {attack: none}", "set: {train: {weight_decay: 5e-4}}"), "write 5.0e-4"),
    (("set: {attack: none}", "set: {train: {milestones: 5}}"), "list of integers"),
    (("set: {attack: none}", "set: {scenario: finetuning}"), "scenario .* must be one of"),
    (("trials: 2", "trials: 0"), "at least 1"),
    (("set: {attack: none}", "set: {train: {epochs: 0}}"), r"train.epochs in .* must lie in \[1, inf\); got 0"),
    (("set: {attack: none}", "set: {train: {lr: .nan}}"), r"train.lr in .* must lie in \(0, inf\); got nan"),
    (("set: {attack: none}", "set: {train: {batch_size: -2}}"), r"train.batch_size in .*; got -2"),
    (("set: {attack: none}", "set: {train: {eval_every: 0}}"), r"train.eval_every in .*; got 0"),
    (("set: {attack: none}", "set: {train: {gamma: .inf}}"), r"train.gamma in .*; got inf"),
    (("id: demo/mini", "id: other/mini"), "must start with its paper"),
    (("    title: mini\n", ""), "no 'title'"),
])
def test_invalid_specs_are_rejected(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        mini(tmp_path, MINIMAL.replace(*change))


def test_ints_widen_to_floats_for_stable_hashes(tmp_path):
    one = mini(tmp_path, MINIMAL.replace("set: {attack: none}", "set: {train: {lr: 1}}"))
    other = mini(tmp_path, MINIMAL.replace("set: {attack: none}", "set: {train: {lr: 1.0}}"))
    assert [j.hash for j in expand(one)] == [j.hash for j in expand(other)]


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownNameError, match=r"unknown table 'shortcuts/tabel3' \(did you mean 'shortcuts/table3'\?\); known: .*demo/digits"):
        load_table("shortcuts/tabel3")
    with pytest.raises(UnknownNameError, match="unknown suite 'demoo'.*known: .*all, .*demo"):
        load_suite("demoo")
    with pytest.raises(UnknownNameError, match="unknown profile 'fast'; known: .*cpu, paper, quick"):
        load_profile("fast")
    with pytest.raises(UnknownNameError, match="unknown profile"):
        load_table("demo/digits").cells("gpu")


def test_configs_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("POISONBENCH_CONFIGS", str(tmp_path))
    write(tmp_path / "tables" / "demo" / "mini.yaml", MINIMAL)
    write(tmp_path / "tables" / "demo" / "wrong.yaml", MINIMAL)
    write(tmp_path / "suites" / "all.yaml", "tables: all\n")
    write(tmp_path / "suites" / "bad.yaml", "tables: [demo/mini, demo/nope]\n")
    assert table_ids() == ["demo/mini", "demo/wrong"]
    assert load_suite("all") == ["demo/mini", "demo/wrong"]
    with pytest.raises(UnknownNameError, match="unknown table 'demo/nope'"):
        load_suite("bad")
    with pytest.raises(ConfigError, match="declares id 'demo/mini'; expected 'demo/wrong'"):
        load_table("demo/wrong")
    with pytest.raises(UnknownNameError, match="unknown profile 'cpu'; known: none"):
        load_table("demo/mini").cells()


# --------------------------------------------------------------------------- config helpers


def test_deep_merge_returns_new_dicts():
    base = {"a": 1, "train": {"lr": 0.1, "milestones": [1]}}
    merged = config.deep_merge(base, {"train": {"lr": 0.2}, "b": [2]})
    assert merged == {"a": 1, "train": {"lr": 0.2, "milestones": [1]}, "b": [2]}
    merged["train"]["milestones"].append(5)
    assert base == {"a": 1, "train": {"lr": 0.1, "milestones": [1]}}
    assert config.deep_merge({"x": {"y": 1}}, {"x": 3}) == {"x": 3}


def test_load_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        config.load_yaml(tmp_path / "missing.yaml")
    bad = write(tmp_path / "bad.yaml", "a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line \d+"):
        config.load_yaml(bad)
    listing = write(tmp_path / "list.yaml", "- 1\n")
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping"):
        config.load_yaml(listing)
    assert config.load_yaml(write(tmp_path / "empty.yaml", "")) == {}
    twice = write(tmp_path / "twice.yaml", "a: 1\nb: {c: 1, c: 2}\n")
    with pytest.raises(ConfigError, match="twice.yaml is not valid YAML at line 2.*key 'c' appears twice"):
        config.load_yaml(twice)
    anchors = write(tmp_path / "anchors.yaml", "x: &a {k: 1}\ny: *a\nz: {<<: *a, j: 2}\n")
    assert config.load_yaml(anchors) == {"x": {"k": 1}, "y": {"k": 1}, "z": {"k": 1, "j": 2}}


# --------------------------------------------------------------------------- job directories


def test_job_state_and_read_result(tmp_path):
    job = expand(load_table("demo/digits"), trials=1)[0]
    assert job.dir(tmp_path) == tmp_path / "demo" / "digits" / job.hash
    assert job_state(job, tmp_path) == "pending" and read_result(job, tmp_path) is None
    job.dir(tmp_path).mkdir(parents=True)
    assert job_state(job, tmp_path) == "partial"
    result = {"format_version": RESULT_FORMAT_VERSION, "job": job.hash, "config": job.config,
              "metrics": {"test_acc": 50.0}}
    (job.dir(tmp_path) / "result.json").write_text(json.dumps(result))
    assert job_state(job, tmp_path) == "done"
    assert read_result(job, tmp_path) == result
    assert read_results([job], tmp_path) == {job.hash: result}

    (job.dir(tmp_path) / "result.json").write_text(json.dumps({**result, "format_version": 99}))
    with pytest.raises(JobError, match=f"result .*{job.hash}.* has result format_version 99"):
        read_result(job, tmp_path)
    (job.dir(tmp_path) / "result.json").write_text("{")
    with pytest.raises(JobError, match="not valid JSON"):
        read_result(job, tmp_path)


def test_runs_root_follows_home(tmp_path, monkeypatch):
    monkeypatch.setenv("POISONBENCH_HOME", str(tmp_path))
    assert jobs_mod.runs_root() == tmp_path / "runs"


def test_bench_modules_do_not_import_training_code():
    import subprocess
    import sys

    code = ("import sys, poisonbench.bench.render, poisonbench.bench.jobs, poisonbench.config; "
            "bad = [m for m in ('torch', 'lightning', 'matplotlib') if m in sys.modules]; "
            "print(', '.join(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def test_adhoc_config_lets_the_command_line_win():
    from poisonbench.bench.profiles import adhoc_config

    config = adhoc_config("cpu", "shortcuts", [{"dataset": "cifar10", "model": "vgg11"}, {}])
    epochs = load_profile("cpu").family("shortcuts").train["epochs"]
    assert (config["dataset"], config["model"], config["train"]["epochs"]) == ("cifar10", "vgg11", epochs)
    assert set(config) == set(DEFAULTS)
    assert adhoc_config("paper", "shortcuts", [{"model": "vgg11"}])["train"]["lr"] == 0.01
    assert adhoc_config("paper", "shortcuts", [{"model": "vgg11"}, {"train": {"lr": 0.2}}])["train"]["lr"] == 0.2
    with pytest.raises(ConfigError, match="unknown key 'modle' in the command-line options"):
        adhoc_config("paper", "shortcuts", [{"modle": "vgg11"}])


def test_adhoc_config_command_line_beats_the_profiles_overrides():
    from poisonbench.bench.profiles import adhoc_config

    profile = load_profile("cpu").family("shortcuts")
    attack = next(iter(profile.attack_override))
    key = next(k for k, v in profile.attack_override[attack].items() if isinstance(v, int))
    config = adhoc_config("cpu", "shortcuts", [{"attack": attack}, {"attack_params": {key: 12345}}])
    assert config["attack_params"][key] == 12345
    # Untouched keys of the profile's override stay; without a command-line value it wins.
    assert {k: v for k, v in config["attack_params"].items() if k != key} == \
        {k: v for k, v in profile.attack_override[attack].items() if k != key}
    assert adhoc_config("cpu", "shortcuts", [{"attack": attack}])["attack_params"] == profile.attack_override[attack]
    defense = next(iter(profile.defense_override))
    config = adhoc_config("cpu", "shortcuts", [{"defense": defense, "defense_params": {"weights": "mine"}}])
    assert config["defense_params"]["weights"] == "mine"


def test_check_job_config_names_key_and_value():
    from poisonbench.schema.job_config import check_job_config

    job = expand(load_table("demo/digits"), trials=1)[0].config
    check_job_config(job, "job x")
    for change, message in [({"train": {**job["train"], "epochs": "3"}}, "train.epochs in job x must be an integer"),
                            ({"seed": -1}, r"seed in job x must lie in \[0, 4294967296\)"),
                            ({"trial": "0"}, "trial in job x must be an integer"),
                            ({"ratio": 2.0}, r"ratio in job x must lie in \[0, 1\]"),
                            ({"colour": 1}, "unknown key 'colour' in job x")]:
        with pytest.raises(ConfigError, match=message):
            check_job_config({**job, **change}, "job x")


def test_profile_attack_override_best_of_and_cell_sets():
    # cpu shrinks crafting models per attack, keeping the table's own budget.
    cells = {(c.row, c.column): c.config for c in load_table("shortcuts/table7").cells("cpu")}
    em = cells["error_minimizing", "eps16"]["attack_params"]
    assert em["model"] == "small_cnn" and em["eps"] == pytest.approx(16 / 255)
    # A row's per-cell set: synthetic gets ε' 12/255 where the others get 16/255.
    assert cells["synthetic", "eps16"]["attack_params"]["eps"] == pytest.approx(12 / 255)
    assert cells["synthetic", "eps32"]["attack_params"]["eps"] == pytest.approx(24 / 255)
    # defense_override replaces the backbone wholesale.
    assert cells["ntga", "eps16"]["defense_params"] == {"weights": "backbones/digits_simclr_small_cnn.safetensors",
                                                      "pretrain": {"method": "simclr"}}
    spec = load_table("shortcuts/table4")
    assert "adversarial_training" not in {c.column for c in spec.cells()}  # derived: no jobs


def test_best_of_column_picks_the_best_member_and_names_it():
    from test_bench_render import fake_result

    spec = load_table("shortcuts/table4")
    jobs = [j for j in expand(spec, trials=1) if j.row == "none"]
    values = {"at_eps2": 80.0, "at_eps4": 85.0, "at_eps8": 70.0}
    results = {j.hash: fake_result(j, values[j.column]) for j in jobs if j.column in values}
    cells = {c.column: c for c in aggregate(spec, jobs, results) if c.row == "none"}
    best = cells["adversarial_training"]
    assert best.mean == 85.0 and best.chosen == "Adv. training ε=4/255" and best.trials == 0


def test_best_of_must_name_columns_with_jobs(tmp_path):
    text = MINIMAL.replace("      - {id: b, name: B, set: {dataset: svhn}}", "      - {id: b, name: B, best_of: [c]}")
    with pytest.raises(ConfigError, match="best_of of column 'b'.*'c'"):
        mini(tmp_path, text)


def test_drop_poisoned_trains_on_the_clean_remainder(digits):
    import torch

    from poisonbench.data.module import PoisonedDataModule
    from poisonbench.data.store import PoisonStore

    train, test = digits
    store = PoisonStore.empty(train, "none", {}, seed=7)
    module = PoisonedDataModule(train, test, store, ratio=0.8, drop_poisoned=True)
    module.setup()
    assert len(module.train_set) == len(train) - round(0.8 * len(train))
    again = PoisonedDataModule(train, test, store, ratio=0.8, drop_poisoned=True)
    again.setup()
    assert torch.equal(module.train_set.images, again.train_set.images)  # fixed by the store's seed
