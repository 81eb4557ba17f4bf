"""Shared test fixtures: an isolated poisonbench home, fixture datasets in the real
on-disk formats, and the embedded digits data. Nothing downloads, nothing needs a GPU."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory):
    """Stores, runs and leaderboards of the tests go to a temporary folder."""
    home = tmp_path_factory.mktemp("pbhome")
    saved = {k: os.environ.get(k) for k in ("POISONBENCH_HOME", "POISONBENCH_LEADERBOARDS", "WANDB_MODE", "POISONBENCH_COMMIT", "WANDB_SILENT")}
    os.environ.update(POISONBENCH_HOME=str(home), POISONBENCH_LEADERBOARDS=str(home / "leaderboards"),
                      WANDB_MODE="offline", POISONBENCH_COMMIT="testcommit", WANDB_SILENT="true")
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory):
    """cifar10, cifar100 and svhn as tiny files in their real formats."""
    from poisonbench.data.fixtures import write_fixtures

    root = tmp_path_factory.mktemp("data")
    write_fixtures(root)
    return root


@pytest.fixture(scope="session")
def digits():
    from poisonbench.data import load_imageset

    return load_imageset("digits", split="train"), load_imageset("digits", split="test")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for tiny crafting workloads (restored afterwards): on a shared,
    loaded 2-core machine two OpenMP threads made a smoke craft 0.12 s → 18 s."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
