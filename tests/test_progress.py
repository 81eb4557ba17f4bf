"""Nested progress: under `run`'s display, crafting steps and training epochs add their
own bars to it (rich allows one live display), and remove them when done."""
from __future__ import annotations

from rich.console import Console
from rich.progress import Progress

from poisonbench import progress as progress_bars
from poisonbench.fitting.fit import fit_clean
from poisonbench.models import build_model

RECIPE = {"epochs": 2, "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
          "milestones": [], "gamma": 0.1, "accelerator": "cpu", "devices": 1}


def test_steps_add_their_bars_to_the_runs_display(digits, one_thread):
    train, _ = digits
    seen = []
    with Progress(console=Console(file=open("/dev/null", "w"))) as progress, progress_bars.shared(progress):
        added = []
        add_task = progress.add_task
        progress.add_task = lambda description, **kw: added.append(description) or add_task(description, **kw)
        assert progress_bars.active()
        with progress_bars.bar("crafting", 3, loss="-") as update:
            update(1, loss="0.5")
            seen.append([(t.description, t.completed) for t in progress.tasks])
        fit_clean(build_model("small_cnn", 10, width=4), train, RECIPE, seed=0)
        assert added == ["crafting", "epochs"] and progress.tasks == []  # every step removed its bar
    assert seen == [[("crafting", 1)]]
    assert not progress_bars.active()
    with progress_bars.bar("alone", 2) as update:  # no run: a transient display of its own
        update(2)
