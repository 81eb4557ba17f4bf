"""Bad input gets one sentence and exit code 2, never a traceback, never a half-written
file; the verbs that need no training work on the embedded data."""
from __future__ import annotations

import json

import pytest

from poisonbench.cli import main


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("argv, fragments", [
    (["craft", "nope", "--dataset", "digits"], ["unknown attack 'nope'", "synthetic"]),
    (["craft", "synthetic", "--dataset", "mnist"], ["unknown dataset 'mnist'", "cifar10"]),
    (["craft", "synthetic", "--dataset", "digits", "--set", "radius=3"], ["unknown parameter 'radius'"]),
    (["train", "--dataset", "digits", "--model", "resnet19"], ["unknown model 'resnet19'", "resnet18"]),
    (["train", "--dataset", "digits", "--model", "small_cnn", "--set", "train.epoch=3"], ["unknown key 'epoch'"]),
    (["run", "--table", "shortcuts/table99"], ["unknown table", "shortcuts/table3"]),
    (["run", "--suite", "everything"], ["unknown suite", "demo"]),
    (["run", "--suite", "demo", "--profile", "fast"], ["unknown profile", "cpu"]),
    (["run", "--table", "demo/digits", "--rows", "nope"], ["no row 'nope'"]),
    (["run", "--table", "demo/digits", "--bogus"], ["unrecognized arguments"]),
    (["list", "widgets"], ["invalid choice"]),
    (["craft", "synthetic", "--dataset", "digits", "--set", "patch=5"], ["patch 5 must divide"]),
    (["craft", "synthetic", "--dataset", "digits", "--set", "patch=32"], ["too few for 10 classes"]),
    (["craft", "synthetic", "--dataset", "digits", "--seed", "-1"], ["seed must lie in"]),
    (["craft", "synthetic", "--dataset", "digits", "--set", "a=1", "a.b=2"], ["cannot also hold keys"]),
    (["run", "--suite", "all", "--rows", "nonexistent", "--dry-run"], ["no table of the suite has row"]),
])
def test_bad_input_is_one_sentence(capsys, argv, fragments):
    code, _, err = run_cli(capsys, *argv)
    one_line_error(code, err, *fragments)


def test_missing_data_names_path_and_command(capsys, tmp_path):
    code, _, err = run_cli(capsys, "craft", "synthetic", "--dataset", "cifar10", "--data-root", str(tmp_path))
    one_line_error(code, err, str(tmp_path), "poisonbench data download cifar10")


def test_craft_inspect_and_broken_stores(capsys, tmp_path):
    out_file = tmp_path / "syn.safetensors"
    code, out, err = run_cli(capsys, "craft", "synthetic", "--dataset", "digits", "--seed", "3", "--out", str(out_file))
    assert code == 0, err
    assert out_file.is_file()
    code, out, err = run_cli(capsys, "inspect", str(out_file), "--png", str(tmp_path / "grid.png"))
    assert code == 0, err
    assert "synthetic" in out and "max linf" in out and "mean l2" in out
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    # truncated
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(out_file.read_bytes()[:1000])
    one_line_error(*run_cli(capsys, "inspect", str(broken))[::2], "truncated")
    # corrupted: one flipped bit in the pixels
    data = bytearray(out_file.read_bytes())
    data[-3] ^= 0x10
    broken.write_bytes(bytes(data))
    one_line_error(*run_cli(capsys, "inspect", str(broken))[::2], "content hash")


def test_failed_craft_writes_no_file(capsys, tmp_path):
    out_file = tmp_path / "never.safetensors"
    code, _, err = run_cli(capsys, "craft", "synthetic", "--dataset", "digits", "--set", "eps=2", "--out", str(out_file))
    one_line_error(code, err, "eps")
    assert not out_file.exists() and not list(tmp_path.iterdir())


def test_list_and_dry_run(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and "synthetic" in out and "small_cnn" in out and "demo/digits" in out
    code, out, _ = run_cli(capsys, "run", "--table", "demo/digits", "--dry-run")
    assert code == 0 and "15 jobs" in out and "pending" in out


def test_incompatible_job_directory(capsys, caplog, tmp_path):
    from poisonbench.bench.jobs import expand, runs_root
    from poisonbench.bench.tables import load_table

    job = expand(load_table("demo/digits"), trials=1)[0]
    job_dir = job.dir(runs_root())
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "result.json").write_text(json.dumps({"format_version": 99}))
    try:  # one foreign result is left out with a warning; the table's other results still render
        code, _, err = run_cli(capsys, "leaderboard", "--table", "demo/digits")
        warned = err + caplog.text  # logging's last-resort handler prints it on the console
        assert code == 0 and str(job_dir) in warned and "format_version" in warned and "Traceback" not in err, err
    finally:
        (job_dir / "result.json").unlink()
    (tmp_path / "config.yaml").write_text("just: text\n")
    one_line_error(*run_cli(capsys, "job", str(tmp_path))[::2], "not a job config")


def test_debug_shows_the_traceback(capsys):
    from poisonbench.errors import UnknownNameError

    with pytest.raises(UnknownNameError):
        main(["--debug", "craft", "nope", "--dataset", "digits"])
