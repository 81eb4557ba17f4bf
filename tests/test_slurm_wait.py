"""How the slurm executor waits for its array tasks, with stand-ins for submitit's
futures and for squeue (the real cluster: tests/test_slurm.py)."""
from __future__ import annotations

import types
from pathlib import Path

import pytest

from poisonbench.bench import executors
from poisonbench.errors import JobError


class Uncompleted(RuntimeError):
    pass


STAND_IN = types.SimpleNamespace(core=types.SimpleNamespace(utils=types.SimpleNamespace(UncompletedJobError=Uncompleted)))


class Task:
    def __init__(self, job_id: str, done_after: int | None = None, error: str | None = None) -> None:
        self.job_id, self.done_after, self.error, self.looks = job_id, done_after, error, 0
        self.paths = types.SimpleNamespace(stderr=Path(f"/logs/{job_id}_0_log.err"))

    def done(self) -> bool:
        self.looks += 1
        return self.done_after is not None and self.looks > self.done_after

    def result(self) -> None:
        if self.error:
            raise Uncompleted(f"Job raised:\nTraceback ...\n{self.error}\n")


def _wait(monkeypatch, tasks: dict, queued) -> list:
    monkeypatch.setattr(executors, "_queued", lambda: set(queued))
    done: list = []
    executors.wait_slurm(tasks, done.append, STAND_IN, poll_s=0, squeue_every_s=0)
    return done


def test_waits_for_queued_tasks_and_reports_each_once(monkeypatch):
    tasks = {Path("a"): Task("7_0", done_after=0), Path("b"): Task("7_1", done_after=4)}
    assert _wait(monkeypatch, tasks, ["7_1"]) == [Path("a"), Path("b")]


def test_a_task_gone_from_the_queue_without_a_result_fails_the_run(monkeypatch):
    """Without accounting, submitit never learns such a task ended: the run must not wait forever."""
    tasks = {Path("a"): Task("7_0")}
    with pytest.raises(JobError, match=r"job a: SLURM task 7_0 ended without a result.*7_0_0_log.err"):
        _wait(monkeypatch, tasks, [])


def test_a_failed_task_names_its_job_its_error_and_its_log(monkeypatch):
    tasks = {Path("a"): Task("7_0", done_after=0, error="JobError: job a measured nan")}
    with pytest.raises(JobError, match=r"job a failed on SLURM \(task 7_0\): JobError: job a measured nan; see"):
        _wait(monkeypatch, tasks, ["7_0"])


def test_a_requeued_task_resubmits_the_same_job(monkeypatch):
    """submitit's checkpoint hook (time limit, preemption) requeues the same job, which
    resumes from its checkpoint."""
    delayed = []
    helpers = types.SimpleNamespace(DelayedSubmission=lambda *a: delayed.append(a) or a)
    monkeypatch.setattr(executors, "_submitit", lambda: types.SimpleNamespace(helpers=helpers))
    job = executors.ResumableJob()
    assert job.checkpoint("/runs/t/a", None, False) == (job, "/runs/t/a", None, False)
