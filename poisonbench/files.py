"""Atomic writes and the poisonbench home folder.

Everything poisonbench writes (stores, results, leaderboards) goes through a
temporary file in the same folder and ``os.replace``: a killed process leaves
either the whole file or none.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def home() -> Path:
    """``$POISONBENCH_HOME``, else ``~/.cache/poisonbench``."""
    return Path(os.environ.get("POISONBENCH_HOME") or Path.home() / ".cache" / "poisonbench")


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``--data-root``, else ``$POISONBENCH_DATA``, else ``<home>/data``."""
    if root:
        return Path(root)
    if os.environ.get("POISONBENCH_DATA"):
        return Path(os.environ["POISONBENCH_DATA"])
    return home() / "data"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        # After the write: a writer that replaces the file (safetensors does) would bring
        # mkstemp's 0600 back, hiding shared stores and data from the rest of a group.
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Valid JSON only: a non-finite float (which ``json`` would write as a bare
    ``NaN`` or ``Infinity``, unreadable elsewhere) is written as ``null``."""
    write_text(path, json.dumps(finite(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (in dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace: the text that content hashes are taken of."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
