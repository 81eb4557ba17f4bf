"""The content-addressed artifact helper: one key, one path; made once; a damaged entry
or cost record is rebuilt, never fatal."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from poisonbench.artifacts import Artifact, CorruptArtifact, cost_path, get_or_make, read_cost


def _io(calls: list):
    def load(path):
        values = load_file(str(path))["x"]
        if values.numel() != 3:
            raise CorruptArtifact("wrong length")
        return values

    def make(path):
        calls.append(path)
        return torch.arange(3.0)

    def save(value, tmp):
        save_file({"x": value}, str(tmp))

    return dict(load=load, make=make, save=save)


def test_same_key_same_path_and_made_once(tmp_path, monkeypatch):
    monkeypatch.setenv("POISONBENCH_HOME", str(tmp_path))
    a = Artifact("things", {"b": 1, "a": [1, 2]})
    assert a.path == Artifact("things", {"a": [1, 2], "b": 1}).path  # canonical JSON: key order is no part of it
    assert a.path != Artifact("things", {"a": [1, 2], "b": 2}).path
    assert a.path.parent == tmp_path / "things"
    calls: list = []
    first = get_or_make(a, **_io(calls), describe=lambda: {"hardware": "cpu"})
    second = get_or_make(a, **_io(calls))
    assert len(calls) == 1 and not first.cached and second.cached and second.seconds == 0.0
    assert torch.equal(first.value, second.value)
    cost = read_cost(a.path)
    assert cost["hardware"] == "cpu" and cost["seconds"] >= 0
    assert not list(a.path.parent.glob(".*.tmp"))  # the atomic write left no temporary file


def test_damaged_entry_is_made_again(tmp_path, monkeypatch):
    monkeypatch.setenv("POISONBENCH_HOME", str(tmp_path))
    a = Artifact("things", {"k": 1})
    calls: list = []
    get_or_make(a, **_io(calls))
    a.path.write_bytes(b"\x00garbage")  # a truncated or overwritten file
    again = get_or_make(a, **_io(calls))
    assert len(calls) == 2 and not again.cached and torch.equal(again.value, torch.arange(3.0))
    save_file({"x": torch.zeros(5)}, str(a.path))  # another entry's content under this key
    assert not get_or_make(a, **_io(calls)).cached and len(calls) == 3


def test_damaged_cost_record_reads_as_missing(tmp_path):
    entry = tmp_path / "e.safetensors"
    assert read_cost(entry) is None
    for text in ("{", "[1, 2]", json.dumps({"seconds": "abc"}), json.dumps({"seconds": -1.0})):
        cost_path(entry).write_text(text)
        assert read_cost(entry) is None
    cost_path(entry).write_text(json.dumps({"seconds": 2.5}))
    assert read_cost(entry) == {"seconds": 2.5}
