"""Aggregation and leaderboards. The golden test renders the committed results folder
tests/golden/runs to tests/golden/leaderboards byte for byte (STYLE.md convention 9).

After an intended change of the leaderboard format, regenerate the golden files with
``.venv/bin/python tests/golden/regenerate.py`` and review their diff.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from poisonbench import files
from poisonbench.bench.aggregate import TableState, aggregate, mean_sem, table_state
from poisonbench.bench.jobs import expand, read_results
from poisonbench.bench.render import render_all, render_index, render_table
from poisonbench.bench.catalogue import Catalogue, CatalogueEntry
from poisonbench.bench.tables import load_table

GOLDEN = Path(__file__).parent / "golden"


def fake_result(job, value, curve=None, finished_at="2026-01-01T00:00:00+00:00"):
    result = {
        "format_version": 1, "job": job.hash, "config": job.config,
        "metrics": {"test_acc": value},
        "hardware": {"device": "cpu", "name": "test-cpu", "count": 1},
        "versions": {"poisonbench": "0.1.0", "commit": "abc"},
        "finished_at": finished_at,
    }
    if curve is not None:
        result["curves"] = {"epoch": list(range(1, len(curve) + 1)), "test_acc": curve}
    return result


# --------------------------------------------------------------------------- golden


@pytest.mark.parametrize("table, n_results", [("demo/digits", 3), ("shortcuts/table2", 4), ("robuster/fig3", 5)])
def test_golden_leaderboard(tmp_path, monkeypatch, table, n_results):
    monkeypatch.setenv("POISONBENCH_CONFIGS", str(GOLDEN / "configs"))
    spec = load_table(table)
    jobs = expand(spec, trials=2)
    results = read_results(jobs, GOLDEN / "runs")
    assert len(results) == n_results, "golden results do not match the expanded job hashes; see regenerate.py"
    md = render_table(spec, aggregate(spec, jobs, results), results, tmp_path, spec.profile)
    assert md == tmp_path / f"{table}.md"
    for suffix in (".md", ".csv", ".json"):
        expected = (GOLDEN / "leaderboards" / f"{table}{suffix}").read_bytes()
        assert md.with_suffix(suffix).read_bytes() == expected, f"{table}{suffix} differs from the golden file"
    assert md.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Rendering is reproducible: the date comes from the results, not the clock.
    render_table(spec, aggregate(spec, jobs, results), results, tmp_path / "again", spec.profile)
    assert (tmp_path / "again" / f"{table}.json").read_bytes() == md.with_suffix(".json").read_bytes()


def test_golden_paper_setting_has_diffs():
    """demo/digits ran in the setting its spec names: Δ against the references."""
    text = (GOLDEN / "leaderboards" / "demo" / "digits.md").read_text()
    assert "| Row | Paper | Reproduced | Δ |" in text
    assert "| No perturbation | 95.0 | 92.75 ± 0.75 (n=2) | -2.25 |" in text
    assert "not the paper's" not in text
    # 2 trials where the spec asks for 3, and one row not run: the title says so.
    assert text.splitlines()[1] == "# Demo: availability poisoning of the embedded digits (0 of 3 trials)"


def test_golden_other_setting_has_no_diffs():
    """shortcuts/table2 names ResNet-18 on CIFAR-10; the cpu profile ran it on digits."""
    text = (GOLDEN / "leaderboards" / "shortcuts" / "table2.md").read_text()
    title = text.splitlines()[1]
    assert "run: small_cnn on digits, not the paper's resnet18 on cifar10" in title
    assert "2 of 20 trials" in title
    assert "| Row | Paper (resnet18 on cifar10) | Reproduced |" in text
    assert "| None (clean) | 94.69 | 87.25 ± 0.75 (n=2) |" in text
    assert "Δ =" not in text and "no Δ is computed" in text
    assert "## Notes" in text and "- Random noise: A row's note." in text
    rows = list(csv.DictReader((GOLDEN / "leaderboards" / "shortcuts" / "table2.csv").open()))
    assert rows and all(r["diff"] == "" and r["reference"] for r in rows)
    prov = json.loads((GOLDEN / "leaderboards" / "shortcuts" / "table2.json").read_text())["provenance"]
    assert prov["setting"] == {"run": ["small_cnn on digits"], "paper": ["resnet18 on cifar10"], "comparable": False}
    assert prov["versions"] == {"torch": ["2.5.0"], "lightning": ["2.4.0"], "numpy": ["2.1.0"]}
    assert prov["threads"] == ["2"] and len(prov["job_hashes"]) == 4


def _golden_fig3(tmp_path, monkeypatch, out="boards"):
    monkeypatch.setenv("POISONBENCH_CONFIGS", str(GOLDEN / "configs"))
    spec = load_table("robuster/fig3")
    jobs = expand(spec, trials=2)
    results = read_results(jobs, GOLDEN / "runs")
    return spec, jobs, results, render_table(spec, aggregate(spec, jobs, results), results, tmp_path / out, spec.profile)


def _pixels(png: Path, rgb: tuple[float, float, float]) -> int:
    """How many pixels of a PNG have (about) this colour."""
    import numpy as np
    from matplotlib.image import imread

    image = imread(png)[..., :3]
    return int((np.abs(image - np.array(rgb)).max(axis=-1) < 0.02).sum())


TAB_RED, TAB_BLUE = (0xD6 / 255, 0x27 / 255, 0x28 / 255), (0x1F / 255, 0x77 / 255, 0xB4 / 255)


def test_golden_scatter_figure(tmp_path, monkeypatch):
    """robuster/fig3 from the committed results: the .md embeds the scatter, the .json
    holds its points (byte-compared by the golden test above), and the PNG is a fixed
    size, the same bytes on a second render, with the baseline blue and the proposed
    defense red."""
    _, _, _, md = _golden_fig3(tmp_path, monkeypatch)
    text = md.read_text()
    assert "## Figure" in text and "![Figure 3: poison success vs validation accuracy" in text and "](fig3.png)" in text
    assert "Blue: Undefended; red: Adversarial poisoning (p = 0.75); grey: the other rows." in text
    assert "Not drawn, without a result: DP-SGD (n = 0.01) (not implemented: defense 'dp_sgd')." in text
    points = {p["row"]: p for p in json.loads(md.with_suffix(".json").read_text())["figure"]["points"]}
    assert [p["role"] for p in points.values()] == ["baseline", "other", "other", "highlight"]
    assert (points["none"]["x"], points["none"]["y"]) == (91.0, 100.0)
    assert points["adversarial_training_8"]["x_error"] is None  # one trial: no error bar on accuracy
    png = md.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(png) < 500_000
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (720, 540)  # IHDR
    assert b"tEXt" not in png and b"tIME" not in png  # no software, date or time in the metadata
    _, _, _, again = _golden_fig3(tmp_path, monkeypatch, out="again")
    assert again.with_suffix(".png").read_bytes() == png
    assert _pixels(md.with_suffix(".png"), TAB_RED) > 20 and _pixels(md.with_suffix(".png"), TAB_BLUE) > 20


def test_scatter_colours_follow_the_spec(tmp_path, monkeypatch):
    """Without highlight and baseline every point is grey: no red or blue drawn."""
    import shutil

    configs = tmp_path / "configs"
    shutil.copytree(GOLDEN / "configs", configs)
    spec_file = configs / "tables" / "robuster" / "fig3.yaml"
    spec_file.write_text(spec_file.read_text().replace(", highlight: adversarial_poisoning, baseline: none", ""))
    monkeypatch.setenv("POISONBENCH_CONFIGS", str(configs))
    spec = load_table("robuster/fig3")
    jobs = expand(spec, trials=2)
    results = read_results(jobs, GOLDEN / "runs")
    assert len(results) == 5  # the figure is no part of a job's hash
    md = render_table(spec, aggregate(spec, jobs, results), results, tmp_path / "boards", spec.profile)
    assert _pixels(md.with_suffix(".png"), TAB_RED) == 0 and _pixels(md.with_suffix(".png"), TAB_BLUE) == 0
    assert _pixels(md.with_suffix(".png"), (0.55, 0.55, 0.55)) > 20
    assert "Grey: the other rows." in md.read_text() and "Blue:" not in md.read_text()


def test_golden_json_shape():
    doc = json.loads((GOLDEN / "leaderboards" / "demo" / "digits.json").read_text())
    assert list(doc) == ["table", "title", "metric", "higher_is_better", "profile", "provenance", "cells"]
    assert all(list(c) == ["row", "column", "mean", "sem", "n", "reference"] for c in doc["cells"])
    assert doc["provenance"]["date"] == "2026-11-21T12:10:00+00:00"  # latest in time, not in text
    assert doc["provenance"]["hardware"] == ["golden-cpu"]


# --------------------------------------------------------------------------- aggregation


def test_mean_sem_maths():
    values = [90.0, 92.0, 97.0]
    mean, sem, n = mean_sem(values)
    assert n == 3 and mean == pytest.approx(93.0)
    assert sem == pytest.approx(statistics.stdev(values) / math.sqrt(3))
    assert sem == pytest.approx(math.sqrt(((9 + 1 + 16) / 2) / 3))  # ddof = 1
    assert mean_sem([5.0]) == (5.0, None, 1)
    assert mean_sem([]) == (None, None, 0)


def test_aggregate_cells_in_spec_order():
    spec = load_table("demo/digits")
    jobs = expand(spec, trials=3)
    values = {("none", 0): 90.0, ("none", 1): 92.0, ("none", 2): 97.0, ("random_noise", 1): 40.0}
    results = {j.hash: fake_result(j, values[j.row, j.trial]) for j in jobs if (j.row, j.trial) in values}
    cells = aggregate(spec, jobs, results)
    assert [c.row for c in cells][:3] == ["none", "random_noise", "synthetic"]
    none, noise, syn = cells[:3]
    assert (none.n, none.trials, none.values) == (3, 3, (90.0, 92.0, 97.0))
    assert none.mean == pytest.approx(93.0) and none.sem == pytest.approx(statistics.stdev([90, 92, 97]) / math.sqrt(3))
    assert (noise.n, noise.mean, noise.sem) == (1, 40.0, None)
    assert (syn.n, syn.mean, syn.sem, syn.diff) == (0, None, None, None)
    state = table_state(cells)
    assert state == TableState(trials=3, completed=0, jobs=3 * len(spec.rows), done=4)
    assert state.status == "0/3 trials"


def test_aggregate_curves_by_epoch():
    spec = load_table("shortcuts/fig7")
    assert spec.kind == "curves"
    jobs = expand(spec, trials=2, rows=["clean"])
    curves = {0: [10.0, 20.0, 30.0], 1: [20.0, 40.0]}  # the second trial logged fewer epochs
    results = {j.hash: fake_result(j, curves[j.trial][-1], curves[j.trial]) for j in jobs if j.column == "svhn"}
    cells = aggregate(spec, jobs, results)
    svhn = next(c for c in cells if (c.row, c.column) == ("clean", "svhn"))
    assert svhn.curve.epochs == (1, 2, 3)
    assert svhn.curve.mean == pytest.approx((15.0, 30.0, 30.0))
    assert svhn.curve.n == (2, 2, 1) and svhn.curve.sem[2] is None
    assert svhn.mean == pytest.approx(35.0)
    assert next(c for c in cells if c.column == "cifar10" and c.row == "clean").curve is None
    assert next(c for c in cells if c.row == "patch8").trials == 0  # filtered out


def test_curves_table_renders(tmp_path):
    spec = load_table("shortcuts/fig7")
    jobs = expand(spec, trials=2)
    results = {j.hash: fake_result(j, 30.0 + j.trial, [10.0, 20.0, 30.0 + j.trial]) for j in jobs if j.row != "patch8"}
    md = render_table(spec, aggregate(spec, jobs, results), results, tmp_path, "paper")
    assert md.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    text = md.read_text()
    # No paper values at all: no Δ column.
    assert "| Algorithms 1+2 (patch 8) | SVHN | — | not run |" in text
    assert "| clean | SVHN | — | 30.50 ± 0.50 (n=2) |" in text


def test_not_run_cells_and_diffs(tmp_path):
    spec = load_table("shortcuts/table3")
    jobs = expand(spec, trials=2, rows=["resnet18"])
    results = {j.hash: fake_result(j, 94.0 + j.trial) for j in jobs if j.column == "cifar10_clean"}
    md = render_table(spec, aggregate(spec, jobs, results), results, tmp_path, "paper")
    text = md.read_text()
    assert md == tmp_path / "shortcuts" / "table3.md"
    assert "| ResNet-18 | CIFAR-10 D_c | 94.7 | 94.50 ± 0.50 (n=2) | -0.20 |" in text
    assert "| VGG-11 | SVHN D_c | 95.4 | not run | — |" in text
    assert "- Trials: 2 per cell requested, 0 completed in every cell, 20 in the spec; 2 of 12 jobs done" in text
    assert "(0 of 20 trials)" in text.splitlines()[1] and "not the paper's" not in text
    doc = json.loads(md.with_suffix(".json").read_text())
    assert len(doc["cells"]) == 24 and doc["provenance"]["datasets"] == ["cifar10"]
    assert doc["profile"] == "paper" and doc["higher_is_better"] is False


def test_filter_rows_show_what_their_filter_removed(tmp_path):
    spec = load_table("demo/digits-integrity-defenses")
    jobs = expand(spec, trials=2, rows=["none", "spectral_signatures"])
    results = {}
    for j in jobs:
        result = {**fake_result(j, 10.0), "row": j.row, "metrics": {"backdoor_success": 10.0, "val_acc": 80.0},
                  "defense": {"name": j.row, "filter": None}}
        if j.row == "spectral_signatures":  # trial 0 catches 30 of 45 poisons among 60 removed, trial 1 45 of 90
            caught, removed = (30, 60) if j.trial == 0 else (45, 90)
            result["defense"]["filter"] = {"kept": 900 - removed, "removed": removed, "poisons": 45,
                                           "removed_poisons": caught, "precision": caught / removed,
                                           "recall": caught / 45, "filter_s": 0.1}
        results[j.hash] = result
    text = render_table(spec, aggregate(spec, jobs, results), results, tmp_path, "cpu").read_text()
    section = text.split("## Filters", 1)[1]
    assert "| Spectral signatures | 2 | 75.0 | 45.0 | 37.5 | 50.0 | 83.3 |" in section
    assert "| None |" not in section  # an unfiltered row has nothing to report


# --------------------------------------------------------------------------- index


def test_index_statuses(tmp_path):
    catalogue = Catalogue(
        papers={"p": "Paper P"},
        tables=(
            CatalogueEntry("p/absent", "p", "no spec yet"),
            CatalogueEntry("p/idle", "p", "spec, no runs"),
            CatalogueEntry("p/half", "p", "some runs"),
            CatalogueEntry("p/full", "p", "all runs | piped"),
        ),
    )
    states = {
        "p/idle": TableState(trials=20, completed=0, jobs=40, done=0),
        "p/half": TableState(trials=20, completed=3, jobs=40, done=10),
        "p/full": TableState(trials=20, completed=20, jobs=40, done=40),
        "q/extra": TableState(trials=1, completed=1, jobs=1, done=1),
    }
    files.write_text(tmp_path / "p" / "full.md", "x")
    # A committed leaderboard whose runs are not on this disk: the index reads its provenance,
    # and counts its trials against the spec's 20, not the 3 the run asked for.
    files.write_text(tmp_path / "p" / "idle.md", "x")
    files.write_json(tmp_path / "p" / "idle.json", {"provenance": {
        "profile": "cpu", "datasets": ["digits"], "trials": {"requested": 3, "completed": 3, "spec": 20},
        "jobs": {"requested": 12, "completed": 12}}})
    files.write_text(tmp_path / "p" / "half.md", "x")
    files.write_json(tmp_path / "p" / "half.json", {"provenance": {
        "profile": "cpu", "datasets": ["digits"], "trials": {"requested": 3, "completed": 3},
        "jobs": {"requested": 12, "completed": 12}}})
    text = render_index(tmp_path, catalogue, states).read_text()
    assert "## p: Paper P" in text
    assert "| p/absent | no spec yet | not implemented |  |  |" in text
    # No spec of p/idle exists and its leaderboard has no job hashes: nothing vouches for it.
    assert ("| p/idle | spec, no runs | 3/20 trials, **stale** (rendered without job hashes, so not "
            "checkable against the configs) | 12/12 | [p/idle.md](p/idle.md) (profile cpu, digits) |") in text
    # Runs on disk win over what a leaderboard file says.
    assert "| p/half | some runs | 3/20 trials, **stale** " in text
    assert "| p/full | all runs \\| piped | done | 40/40 | [p/full.md](p/full.md) |" in text
    assert "## Other tables" in text and "| q/extra |  | done | 1/1 |  |" in text


def test_status_counts_the_spec_trials_and_every_row():
    """3 of 20 trials is not done, and neither is a run of some rows with one trial."""
    assert TableState(trials=3, completed=3, jobs=12, done=12, spec_trials=20).status == "3/20 trials"
    assert TableState(trials=20, completed=20, jobs=40, done=40, spec_trials=20).status == "done"
    spec = load_table("demo/digits")
    jobs = expand(spec, trials=1, rows=["none", "synthetic"])
    results = {j.hash: fake_result(j, 80.0) for j in jobs}
    state = table_state(aggregate(spec, jobs, results), spec.trials)
    assert (state.jobs, state.done) == (2, 2)
    assert state.status == f"0/{spec.trials} trials"


def _render_demo(configs: Path, runs: Path, boards: Path) -> str:
    """Render demo/digits from fake results of its current jobs, then the index."""
    spec = load_table("demo/digits")
    jobs = expand(spec)
    results = {j.hash: fake_result(j, 60.0 + j.trial) for j in jobs}
    render_table(spec, aggregate(spec, jobs, results), results, boards, spec.profile)
    return render_all(boards, runs, tables=[]) and (boards / "README.md").read_text()


def test_index_marks_a_leaderboard_stale_when_its_config_changes(tmp_path, monkeypatch):
    import shutil

    from poisonbench.bench.catalogue import configs_dir

    configs = tmp_path / "configs"
    shutil.copytree(configs_dir(), configs)
    monkeypatch.setenv("POISONBENCH_CONFIGS", str(configs))
    boards = tmp_path / "boards"
    text = _render_demo(configs, tmp_path / "runs", boards)
    row = next(line for line in text.splitlines() if line.startswith("| demo/digits |"))
    assert "stale" not in row and "[demo/digits.md]" in row
    # An edit that reaches every job (the demo's training recipe) leaves the leaderboard's numbers
    # belonging to jobs the configs no longer make.
    table = configs / "tables" / "demo" / "digits.yaml"
    table.write_text(table.read_text().replace("defaults: {dataset: digits, model: small_cnn}",
                                               "defaults: {dataset: digits, model: small_cnn, ratio: 0.5}"))
    text = render_all(boards, tmp_path / "runs", tables=[]) and (boards / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| demo/digits |"))
    assert "**stale** (15 of 15 jobs no longer match the configs)" in row


def test_render_all_end_to_end(tmp_path):
    runs = tmp_path / "runs"
    spec = load_table("demo/digits")
    for job in expand(spec, trials=spec.trials):
        files.write_json(job.dir(runs) / "result.json", fake_result(job, 50.0 + job.trial))
    states = render_all(tmp_path / "boards", runs)
    assert states["demo/digits"].status == "done"
    assert states["shortcuts/table3"].status == "not run"
    readme = (tmp_path / "boards" / "README.md").read_text()
    assert "| demo/digits |" in readme and "[demo/digits.md](demo/digits.md)" in readme
    assert "| robuster/sec5_4 |" in readme and "| not run |" in readme
    assert not (tmp_path / "boards" / "shortcuts" / "table3.md").exists()  # no results, no leaderboard
    assert "51.00 ± 0.58 (n=3)" in (tmp_path / "boards" / "demo" / "digits.md").read_text()


def test_best_of_column_says_its_error_ignores_the_selection(tmp_path):
    spec = load_table("shortcuts/table4")
    row = spec.rows[0].id
    jobs = expand(spec, trials=2, rows=[row])
    means = {"at_eps2": 40.0, "at_eps4": 60.0, "at_eps8": 50.0}
    results = {j.hash: fake_result(j, means[j.column] + j.trial) for j in jobs if j.column in means}
    cells = aggregate(spec, jobs, results)
    best = next(c for c in cells if c.column == "adversarial_training")
    assert best.mean == pytest.approx(60.5) and best.chosen and best.derived
    text = render_table(spec, cells, results, tmp_path, "paper").read_text()
    assert f"[{best.chosen}]" in text
    assert "its ± is the standard error of that selected column alone, which ignores the selection" in text
    assert "## Notes" in text and "README command starts from zero" in text  # the spec's deviations


def test_a_partial_home_does_not_replace_a_fuller_leaderboard(tmp_path, caplog):
    """A leaderboard made from more results is kept when a home with fewer re-renders it
    (a partial run); --force replaces it."""
    import json

    from poisonbench.bench.aggregate import aggregate
    from poisonbench.bench.jobs import expand
    from poisonbench.bench.render import render_table
    from poisonbench.bench.tables import load_table

    spec = load_table("demo/digits")
    jobs = expand(spec, trials=2)

    def results(n):
        return {j.hash: {"job": j.hash, "config": j.config, "metrics": {"test_acc": 50.0 + j.trial},
                         "finished_at": "2026-12-02T00:00:00+00:00"} for j in jobs[:n]}

    full = results(len(jobs))
    path = render_table(spec, aggregate(spec, jobs, full), full, tmp_path, "cpu")
    before = path.read_text()
    few = results(2)
    render_table(spec, aggregate(spec, jobs, few), few, tmp_path, "cpu")
    assert path.read_text() == before and "kept" in caplog.text
    render_table(spec, aggregate(spec, jobs, few), few, tmp_path, "cpu", force=True)
    assert json.loads(path.with_suffix(".json").read_text())["provenance"]["jobs"]["completed"] == 2
