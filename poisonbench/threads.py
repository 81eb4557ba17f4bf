"""How many intra-op threads a job uses on the CPU.

The floats of a CPU run depend on torch's thread count (how sums are split), so a job
that trains on the CPU runs with ``CPU_JOB_THREADS`` threads wherever it runs: ``train``,
``job``, a local worker, a SLURM task. Its ``result.json`` records the count
(``hardware.threads``). Small models gain little from a second thread (the small CNN on
digits: 10.3 s per job with one thread, 9.5 s with two), so spare cores are better spent
on more jobs at once (``run --jobs-per-device``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

CPU_JOB_THREADS = 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
