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
