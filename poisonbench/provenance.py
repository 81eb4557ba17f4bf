"""Where a number came from: hardware, library versions and the poisonbench commit.

On a CPU the floats of a training run depend on the CPU model (which kernels its
instruction set selects) and on the number of intra-op threads (how sums are split),
besides torch, numpy and lightning; all of them are recorded, so that a number that
does not come back on a rerun can be traced to what differs.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from poisonbench import __version__


# The tracked paths whose edits change results (everything else is docs or output).
RESULT_INPUTS = ("poisonbench", "configs", "pyproject.toml")


@functools.lru_cache(maxsize=1)
def commit() -> str:
    """``$POISONBENCH_COMMIT``, else the checkout's short HEAD, ``+dirty`` when what makes a
    number is edited: the package, the configs or the build file. Leaderboards and prose
    are outputs; rendering one must not mark the next result dirty."""
    if os.environ.get("POISONBENCH_COMMIT"):
        return os.environ["POISONBENCH_COMMIT"]
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--", *RESULT_INPUTS],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``AMD EPYC 7B13``) from /proc/cpuinfo, else what
    ``platform`` knows (``x86_64``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device_type: str = "cpu") -> dict:
    import torch

    if device_type == "cuda" and torch.cuda.is_available():
        return {"device": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                "cpu": cpu_model(), "threads": torch.get_num_threads()}
    return {"device": "cpu", "name": f"{cpu_model()} ({os.cpu_count()} cores)", "count": 1,
            "threads": torch.get_num_threads()}


def versions() -> dict:
    import lightning
    import numpy
    import torch

    return {"poisonbench": __version__, "commit": commit(), "torch": torch.__version__,
            "lightning": lightning.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()
