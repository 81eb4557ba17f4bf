"""The per-device sections of ``make bench`` (poisonbench.bench.speed) at tiny sizes: each
prints its labelled figures as positive numbers, so the benchmark cannot rot silently.
The CPU runs by default; the same checks on a GPU are marked ``gpu``."""
from __future__ import annotations

import re

import pytest
import torch

from poisonbench.bench import packing_speed, speed

NUMBER = r"([\d,]+(?:\.\d+)?)"


def figure(pattern: str, out: str, group: int = 1) -> float:
    match = re.search(pattern, out)
    assert match, f"no line matches {pattern!r} in:\n{out}"
    value = float(match.group(group).replace(",", ""))
    assert value > 0, f"{match.group(0)!r}: expected a positive figure"
    return value


def memory_pattern(device: torch.device) -> str:
    return r"peak CUDA memory [\d.]+ GiB \(max_memory_allocated" if device.type == "cuda" else r"peak RSS \+\d+ MiB"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny sizes: one thread, no stalls on a loaded core


def check_crafting_and_projection(device: torch.device, capsys) -> None:
    costs = speed.bench_crafting([device], batch=2, steps=1, warmup=1)
    speed.bench_projection([c for c in costs if c.attack == "adversarial" and c.model == "resnet18"])
    out = capsys.readouterr().out
    assert len(costs) == 4 and all(c.step_s > 0 for c in costs)
    for attack in speed.CRAFT_ATTACKS:
        for model in ("resnet18", "small_cnn"):
            line = (rf"crafting {attack} \([^)]*\), {model}, {device}, batch 2, median of 1 step after 1: "
                    rf"{NUMBER} s per 1,000 images per step \({NUMBER} s per step\); {memory_pattern(device)}")
            per_1000 = figure(line, out)
            assert figure(line, out, 2) == pytest.approx(per_1000 * 2 / 1000, rel=0.01)
    line = (rf"adversarial on CIFAR-10, resnet18, {device}: projected from a measured fraction \(1 step of 2 "
            rf"images\): 250 steps × 50,000 images: {NUMBER} h with 1 restart, {NUMBER} h with 8 restarts")
    one, eight = figure(line, out), figure(line, out, 2)
    assert eight == pytest.approx(8 * one, rel=0.01)
    assert "several hours" in out and "Fowl et al. 2021b" in out


def check_features(device: torch.device, capsys) -> None:
    rates = speed.bench_features([device], repeats=1, images=3, batch_size=2)
    out = capsys.readouterr().out
    assert len(rates) == len(speed.FEATURE_MODELS) and all(r > 0 for r in rates.values())
    for label, _, _, side in speed.FEATURE_MODELS:
        figure(rf"features {re.escape(label)}, {side}×{side} into the backbone, {device}, 3 images in batches "
               rf"of 2: {NUMBER} images/s", out)


def check_lbfgs(device: torch.device, capsys) -> None:
    seconds = speed.bench_lbfgs([device], n=200, d=8, classes=3)
    out = capsys.readouterr().out
    assert seconds[str(device)] > 0
    line = (rf"L-BFGS linear fit \(probe.fit_lbfgs with linear_eval's probe: 50 steps × ≤20 iterations, "
            rf"lr 0.5\), 200 × 8 random features, 3 random classes, {device}: {NUMBER} s \(median of \d+; "
            rf"{NUMBER} iterations, {NUMBER} loss evaluations")
    for group in (1, 2, 3):
        figure(line, out, group)


def check_gradient_matching(device: torch.device, capsys) -> None:
    speed.bench_gradient_matching([device], steps=1, models={"small_cnn": {"pool": 1, "width": 4}}, poisons=4)
    out = capsys.readouterr().out
    figure(rf"gradient_matching small_cnn, {device}: {NUMBER} s per 100 poisons per step \(4 poisons, mean of 1 steps\)",
           out)


def check_packing(device: torch.device, capsys) -> None:
    figures = packing_speed.bench_packing([device], trials=2, steps=1, repeats=1, batch=4,
                                          model_params={"pool": 1, "width": 4})
    out = capsys.readouterr().out
    assert len(figures) == 4 and all(v > 0 for v in figures.values())
    line = (rf"packing small_cnn \(pool 1, width 4; per-trial middle convs\), {device}[^,]*(?:, 1 thread)?, batch 4, "
            rf"1 steps, digits with crop and flip: 1 trial {NUMBER} images/s; 2 trials in turn {NUMBER} images/s; "
            rf"2 trials packed {NUMBER} images/s; packed / in turn {NUMBER} \(median of 1 rounds\)")
    one, turn, packed, ratio = (figure(line, out, g) for g in (1, 2, 3, 4))
    assert ratio == pytest.approx(packed / turn, rel=0.02, abs=0.01)


CHECKS = [check_crafting_and_projection, check_features, check_lbfgs, check_gradient_matching, check_packing]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_sections_print_positive_figures_on_cpu(check, capsys):
    check(torch.device("cpu"), capsys)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_sections_print_positive_figures_on_gpu(check, capsys):
    check(torch.device("cuda"), capsys)


def test_sections_and_devices_are_checked():
    assert speed.parse_sections("lbfgs, crafting") == ["crafting", "lbfgs"]
    with pytest.raises(ValueError, match="did you mean 'features'"):
        speed.parse_sections("featurs")
    assert speed.parse_devices("cpu") == [torch.device("cpu")]
    auto = speed.parse_devices("auto")
    assert auto[0] == torch.device("cpu") and len(auto) == 1 + torch.cuda.is_available()
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        speed.parse_devices("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            speed.parse_devices("cpu,cuda")
    with pytest.raises(SystemExit):
        speed.main(["--only", "nope"])


def test_sig_keeps_three_digits_without_exponents():
    assert speed.sig(2067.4) == "2,067"
    assert speed.sig(0.0123456) == "0.0123"
    assert speed.sig(12.345) == "12.3"
