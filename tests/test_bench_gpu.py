"""``make bench``'s ``gpu`` section (poisonbench.bench.gpu_speed): its tiny CPU version
runs and prints its figures, the FLOP count is the CIFAR ResNet-18's, and the peak
table knows the devices it names (and says so when it does not)."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from poisonbench.bench import gpu_speed, speed

TINY = dataclasses.replace(gpu_speed.CPU_SIZES, images=64, epochs=3, workers=(), worker_images=64,
                           craft_batch=8, craft_steps=(1, 2))


def test_peak_table_by_device_name():
    assert gpu_speed.peak_tflops("NVIDIA H200") == 989
    assert gpu_speed.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert gpu_speed.peak_tflops("NVIDIA H100 PCIe") == 756
    assert gpu_speed.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert gpu_speed.peak_tflops("NVIDIA A10") == 125
    assert gpu_speed.peak_tflops("NVIDIA L4") == 121 and gpu_speed.peak_tflops("NVIDIA L40S") == 362
    assert gpu_speed.peak_tflops("NVIDIA A10G") is None  # not A10, not in the table
    assert gpu_speed.peak_tflops("Tesla V100-SXM2-16GB") is None


def test_resnet18_costs_3_33_gflop_per_image_forward_and_backward():
    assert gpu_speed.flops_per_image("resnet18", {}) / 1e9 == pytest.approx(3.33, abs=0.005)


def test_section_is_registered():
    assert "gpu" in speed.SECTIONS and speed.parse_sections("gpu") == ["gpu"]


def _figures(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("gpu: ")]


def test_tiny_cpu_version_prints_its_figures(capsys):
    figures = gpu_speed.bench_gpu([torch.device("cpu")], TINY)
    lines = _figures(capsys.readouterr().out)
    assert any("job path (fit) (precision 32-true, compile off, resident data off)" in line for line in lines)
    assert any("plain loop (fp32, eager)" in line for line in lines)
    assert any(re.search(r"crafting PGD step, small_cnn, batch 8: fp32 [\d.,]+ s, bf16 [\d.,]+ s", line)
               for line in lines)
    for key in ("job_images_per_s", "plain_images_per_s", "job_tflops", "job_over_plain",
                "craft_fp32_per_1000_s", "craft_bf16_per_1000_s"):
        assert figures[key] > 0, key
    assert all("peak unknown" in line for line in lines if "images/s" in line and "worker" not in line)


@pytest.mark.slow  # starts two worker processes (torch and Lightning imported in each)
def test_workers_run_side_by_side(capsys):
    figures = gpu_speed.bench_gpu([torch.device("cpu")], dataclasses.replace(TINY, workers=(2,)))
    assert figures["workers_2_images_per_s"] > 0
    assert any("2 worker processes on cpu" in line for line in _figures(capsys.readouterr().out))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_figures_on_cuda(capsys):
    sizes = dataclasses.replace(gpu_speed.GPU_SIZES, images=4096, workers=(2,), worker_images=2048)
    figures = gpu_speed.bench_gpu([torch.device("cuda")], sizes)
    out = capsys.readouterr().out
    assert "compile on, resident data on" in out and "bf16-mixed" in out
    assert figures["job_tflops"] > 0 and figures["workers_2_images_per_s"] > 0
