"""Where a number came from: hardware, library versions and the poisonbench commit."""
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


def hardware(device_type: str = "cpu") -> dict:
    import torch

    if device_type == "cuda" and torch.cuda.is_available():
        return {"device": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    cpu = platform.processor() or platform.machine()
    return {"device": "cpu", "name": f"{cpu} ({os.cpu_count()} cores)", "count": 1}


def versions() -> dict:
    import lightning
    import torch

    return {"poisonbench": __version__, "commit": commit(), "torch": torch.__version__,
            "lightning": lightning.__version__, "python": platform.python_version()}


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()
