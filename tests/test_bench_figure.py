"""A table's declared figure (``figure: {kind: scatter, ...}``) and what ``--wandb``
logs for a leaderboard: the multi-metric W&B Table, and the scatter as a W&B plot and
the PNG. wandb is an optional extra, so a fake module records what would be logged."""
from __future__ import annotations

import shutil
import sys
import textwrap
import types
from pathlib import Path

import pytest

from poisonbench.bench import runner
from poisonbench.bench.jobs import expand
from poisonbench.bench.tables import FigureSpec, load_table
from poisonbench.errors import ConfigError

GOLDEN = Path(__file__).parent / "golden"

SPEC = """\
    id: demo/fig
    paper: demo
    title: fig
    metrics: [poison_success, val_acc]
    profile: cpu
    trials: 1
    figure: {figure}
    rows:
      - {{id: none, set: {{defense: none}}}}
      - {{id: ap, set: {{defense: adversarial_poisoning}}}}
"""


def spec_with(tmp_path, figure, kind="table"):
    path = tmp_path / "fig.yaml"
    path.write_text(textwrap.dedent(SPEC.format(figure=figure)) + f"kind: {kind}\n")
    return load_table(path)


# --------------------------------------------------------------------------- the spec


def test_figure_is_parsed_with_single_or_listed_rows(tmp_path):
    spec = spec_with(tmp_path, "{kind: scatter, x: val_acc, y: poison_success, highlight: ap, baseline: [none]}")
    assert spec.figure == FigureSpec("scatter", "val_acc", "poison_success", highlight=("ap",), baseline=("none",))
    assert spec_with(tmp_path, "null").figure is None


def test_the_shipped_figure3_declares_its_scatter():
    figure = load_table("robuster/fig3").figure
    assert (figure.kind, figure.x, figure.y) == ("scatter", "val_acc", "poison_success")
    assert figure.highlight == ("adversarial_poisoning",) and figure.baseline == ("none",)


@pytest.mark.parametrize("figure, message", [
    ("{kind: bars, x: val_acc, y: poison_success}", "kind of figure in table demo/fig must be one of scatter"),
    ("{kind: scatter, x: test_acc, y: poison_success}", "x of figure in table demo/fig must be one of the table's metrics"),
    ("{kind: scatter, x: val_acc, y: val_acc}", "a scatter needs two metrics"),
    ("{kind: scatter, x: val_acc, y: poison_success, highlight: nope}", "highlight of figure in table demo/fig names row 'nope'"),
    ("{kind: scatter, x: val_acc, y: poison_success, highlight: ap, baseline: ap}", "row 'ap' as both highlight and baseline"),
    ("{kind: scatter, x: val_acc, y: poison_success, colour: red}", "unknown key 'colour' in figure"),
    ("{kind: scatter, x: val_acc}", "'y'"),
    ("{kind: scatter, x: val_acc, y: poison_success, baseline: 3}", "baseline of figure in table demo/fig must be a row id"),
])
def test_bad_figures_are_one_sentence(tmp_path, figure, message):
    with pytest.raises(ConfigError) as err:
        spec_with(tmp_path, figure)
    assert message in str(err.value)


def test_a_curves_table_cannot_declare_a_scatter(tmp_path):
    with pytest.raises(ConfigError, match="needs kind table"):
        spec_with(tmp_path, "{kind: scatter, x: val_acc, y: poison_success}", kind="curves")


def test_bad_figure_is_exit_2_on_the_command_line(tmp_path, capsys, isolated_home):
    from poisonbench.cli import main

    path = tmp_path / "fig.yaml"
    path.write_text(textwrap.dedent(SPEC.format(figure="{kind: scatter, x: val_acc, y: nope}")))
    assert main(["run", "--table", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "y of figure in table demo/fig must be one of the table's metrics" in err and "Traceback" not in err


# --------------------------------------------------------------------------- W&B


class FakeRun:
    def __init__(self, log: list, **kwargs):
        self.kwargs, self.logged, self.finished = kwargs, {}, False
        log.append(self)

    def log(self, data):
        self.logged.update(data)

    def finish(self):
        self.finished = True


def fake_wandb(monkeypatch) -> list[FakeRun]:
    """A ``wandb`` module that records each run and what it logs."""
    runs: list[FakeRun] = []
    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: FakeRun(runs, **kwargs)
    module.Table = lambda columns, data: types.SimpleNamespace(kind="table", columns=list(columns), data=list(data))
    module.Image = lambda path, caption=None: types.SimpleNamespace(kind="image", path=path, caption=caption)
    module.plot = types.SimpleNamespace(scatter=lambda table, x, y, title=None: types.SimpleNamespace(
        kind="scatter", table=table, x=x, y=y, title=title))
    monkeypatch.setitem(sys.modules, "wandb", module)
    return runs


def golden_plan(tmp_path, monkeypatch, table):
    """The golden results of ``table`` in a fresh home, as the runner would find them."""
    monkeypatch.setenv("POISONBENCH_CONFIGS", str(GOLDEN / "configs"))
    monkeypatch.setenv("POISONBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("POISONBENCH_LEADERBOARDS", str(tmp_path / "boards"))
    shutil.copytree(GOLDEN / "runs" / table, tmp_path / "home" / "runs" / table)
    spec = load_table(table)
    return runner.Plan(spec, expand(spec, trials=2))


def test_wandb_logs_the_multi_metric_table_the_scatter_and_its_png(tmp_path, monkeypatch):
    runs = fake_wandb(monkeypatch)
    path = runner.write_leaderboard(golden_plan(tmp_path, monkeypatch, "robuster/fig3"), wandb=True)
    [run] = runs
    assert run.finished and run.kwargs["job_type"] == "aggregate" and run.kwargs["group"] == "robuster/fig3"
    assert set(run.logged) == {"leaderboard", "scatter", "figure"}
    table = run.logged["leaderboard"]
    assert table.columns == ["row", "column", "metric", "mean", "error", "n", "reference",
                             "val_acc", "val_acc_error", "val_acc_n", "val_acc_reference"]
    rows = {r[0]: dict(zip(table.columns, r)) for r in table.data}
    assert len(rows) == 4
    assert rows["none"]["metric"] == "poison_success" and rows["none"]["mean"] == 100.0
    assert (rows["none"]["val_acc"], rows["none"]["val_acc_error"], rows["none"]["val_acc_n"]) == (91.0, 0.5, 2)
    assert rows["dp_sgd_1e-2"]["mean"] is None  # planned: shown, not run
    scatter = run.logged["scatter"]
    assert (scatter.x, scatter.y) == ("val_acc", "poison_success")
    drawn = [dict(zip(scatter.table.columns, r)) for r in scatter.table.data]
    assert [(p["label"], p["role"], p["val_acc"], p["poison_success"]) for p in drawn] == [
        ("Undefended", "baseline", 91.0, 100.0),
        ("Adversarial training (ε = 8)", "other", 80.25, 0.0),
        ("Adversarial poisoning (p = 0.75)", "highlight", 88.5, 50.0),
    ]
    assert run.logged["figure"].path == str(path.with_suffix(".png"))


def test_wandb_logs_only_the_table_where_no_figure_is_declared(tmp_path, monkeypatch):
    runs = fake_wandb(monkeypatch)
    runner.write_leaderboard(golden_plan(tmp_path, monkeypatch, "demo/digits"), wandb=True)
    [run] = runs
    assert set(run.logged) == {"leaderboard"}
    table = run.logged["leaderboard"]
    assert table.columns == ["row", "column", "metric", "mean", "error", "n", "reference"]
    assert {r[2] for r in table.data} == {"test_acc"} and len(table.data) == 3


# --------------------------------------------------------------------------- the digits tables


def _named(spec, key):
    return {cell.row: cell.config[key] for cell in spec.cells()}


def test_a_row_left_out_of_the_run_still_reads_not_implemented(tmp_path, monkeypatch):
    """A planned defense's cell says so even when ``--rows`` left its row out."""
    from poisonbench.bench.aggregate import aggregate

    monkeypatch.setenv("POISONBENCH_CONFIGS", str(GOLDEN / "configs"))
    spec = load_table("robuster/fig3")
    cells = {c.row: c for c in aggregate(spec, expand(spec, trials=1, rows=["none"]), {})}
    assert cells["dp_sgd_1e-2"].trials == 0 and cells["dp_sgd_1e-2"].missing == "defense 'dp_sgd'"
    assert cells["adversarial_poisoning"].missing is None


def test_digits_integrity_has_the_transfer_rows_and_keeps_its_jobs(tmp_path):
    from poisonbench.attacks import ATTACKS
    from poisonbench.bench.aggregate import aggregate
    from poisonbench.bench.catalogue import planned_catalogue
    from poisonbench.bench.render import render_table

    spec = load_table("demo/digits-integrity")
    transfer = ["poison_frogs_transfer", "bullseye_transfer", "hidden_trigger_transfer"]
    assert spec.row_ids[-3:] == transfer
    for cell in spec.cells():
        if cell.row in transfer:
            assert cell.config["scenario"] == "transfer" and cell.config["base_model"] == {}
            assert (cell.config["dataset"], cell.config["model"]) == ("digits", "small_cnn")
            if cell.column == "defended":  # robuster Table 3: gradient matching, p = 0.75, for every row
                assert cell.config["defense_params"].get("attack", "gradient_matching") == "gradient_matching"
                assert cell.config["defense_params"]["p"] == 0.75
    assert next(r for r in spec.rows if r.id == "hidden_trigger_transfer").metric == "backdoor_success"
    # The rows that ran before keep their jobs (and the committed leaderboard its numbers).
    old = tmp_path / "old.yaml"
    text = spec.path.read_text()
    old.write_text(text[:text.index("  - id: poison_frogs_transfer")])
    before = [j.hash for j in expand(load_table(old))]
    assert [j.hash for j in expand(spec) if j.row not in transfer] == before
    # Attacks still to come load, expand and render as "not implemented".
    planned = planned_catalogue().planned.get("attacks", frozenset())
    attacks = {_named(spec, "attack")[row] for row in transfer}
    assert attacks <= planned | set(ATTACKS.names())
    jobs = expand(spec, trials=1)
    text = render_table(spec, aggregate(spec, jobs, {}), {}, tmp_path / "boards", "cpu", force=True).read_text()
    for attack in attacks & planned:
        assert f"not implemented (attack '{attack}')" in text


def test_digits_integrity_defenses_runs_table2s_rows_against_a_backdoor():
    from poisonbench.bench.catalogue import load_suite, planned_catalogue
    from poisonbench.defenses import DEFENSES

    spec = load_table("demo/digits-integrity-defenses")
    table2 = load_table("robuster/table2")
    assert spec.row_ids == table2.row_ids and spec.profile == "cpu"
    assert (spec.metric, spec.extra_metrics) == ("backdoor_success", ("val_acc",))
    mine, theirs = {c.row: c.config for c in spec.cells()}, {c.row: c.config for c in table2.cells()}
    for row, config in mine.items():
        assert (config["attack"], config["scenario"], config["dataset"]) == ("backdoor_patch", "scratch", "digits")
        assert config["defense"] == theirs[row]["defense"]
        params, paper = config["defense_params"], theirs[row]["defense_params"]
        assert {k: params[k] for k in paper if k != "attack"} == {k: v for k, v in paper.items() if k != "attack"}
    assert mine["adversarial_poisoning_50"]["defense_params"]["attack"] == "patch"  # a backdoor's inner attack
    assert mine["adversarial_training_16"]["defense_params"]["steps"] == 2  # CPU minutes
    planned = planned_catalogue().planned.get("defenses", frozenset())
    assert {c["defense"] for c in mine.values()} <= planned | set(DEFENSES.names())
    assert spec.figure.highlight == ("adversarial_poisoning_25", "adversarial_poisoning_50", "adversarial_poisoning_75")
    assert "demo/digits-integrity-defenses" in load_suite("all")
    assert "demo/digits-integrity-defenses" not in load_suite("demo")


def test_the_defenses_suite_holds_both_papers_defense_tables():
    from poisonbench.bench.catalogue import load_suite

    assert set(load_suite("defenses")) == {"shortcuts/table4", "shortcuts/table7", "robuster/table2",
                                            "robuster/table3", "robuster/fig3", "robuster/sec5_4"}


def test_a_table_with_columns_gets_one_point_per_cell(tmp_path):
    """Rows × columns: each cell is a point labelled "row / column", coloured by its row."""
    from poisonbench.bench.aggregate import aggregate
    from poisonbench.bench.render import scatter_points

    path = tmp_path / "cols.yaml"
    path.write_text(textwrap.dedent(SPEC.format(figure="{kind: scatter, x: val_acc, y: poison_success, baseline: none}"))
                    + "columns:\n  - {id: a, name: A}\n  - {id: b, name: B, set: {model: resnet18}}\n")
    spec = load_table(path)
    jobs = expand(spec, trials=2)
    results = {j.hash: {"job": j.hash, "config": j.config,
                        "metrics": {"poison_success": 100.0 * j.trial, "val_acc": 80.0 + j.trial}}
               for j in jobs if j.column == "a"}
    points = scatter_points(spec, aggregate(spec, jobs, results))
    assert [(p["label"], p["role"]) for p in points] == [("none / A", "baseline"), ("none / B", "baseline"),
                                                         ("ap / A", "other"), ("ap / B", "other")]
    assert (points[0]["x"], points[0]["x_error"], points[0]["y"], points[0]["n"]) == (80.5, 0.5, 50.0, 2)
    assert points[1]["x"] is None and points[1]["n"] == 0
