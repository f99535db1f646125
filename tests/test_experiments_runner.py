"""experiments.runner: commands, the done marker, reuse, FORCE, resume, failures and parallel jobs, on a tiny
stand-in entry point (a few lines of Python, no training)."""
import json
import os
import signal
import sys
import threading
import time

import pytest

from experiments import runner
from experiments.runner import Job, run_jobs
from vkd.errors import BadInput, RunFailed

# Records each call in calls.txt beside the output folders, writes its arguments and OMP_NUM_THREADS to the
# output folder, and with --fail prints a few lines and exits 3.
FAKE_ENTRY_POINT = """
import json, os, sys
out = sys.argv[sys.argv.index("--out") + 1]
with open(os.path.join(os.path.dirname(out), "calls.txt"), "a") as handle:
    handle.write(os.path.basename(out) + "\\n")
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "call.json"), "w") as handle:
    json.dump({"argv": sys.argv[1:], "threads": os.environ.get("OMP_NUM_THREADS")}, handle)
if "--sleep" in sys.argv:
    import time
    time.sleep(float(sys.argv[sys.argv.index("--sleep") + 1]))
if "--fail" in sys.argv:
    print("\\n".join(f"line {i}" for i in range(8)))
    sys.exit(3)
"""


@pytest.fixture
def fake_entry_point(tmp_path, monkeypatch):
    script = tmp_path / "fake_entry.py"
    script.write_text(FAKE_ENTRY_POINT)
    monkeypatch.setitem(runner.ENTRY_POINTS, "fake", ([str(script)], "--out"))
    runs = tmp_path / "runs"
    runs.mkdir()

    def job(name, **fields):
        return Job(name, str(runs / name), entry_point="fake", **fields)

    def calls():
        path = runs / "calls.txt"
        return path.read_text().split() if path.exists() else []

    return job, calls


def written_call(job):
    with open(os.path.join(job.output_dir, "call.json")) as handle:
        return json.load(handle)


def test_commands_are_the_config_the_overrides_the_output_folder_and_resume():
    job = Job("row/seed1", "runs/x/seed1", config="configs/x.yaml", overrides=["--seed", "1"])
    assert job.command() == [sys.executable, "main_distributed.py", "--config", "configs/x.yaml", "--seed", "1",
                             "--output_dir", "runs/x/seed1"]
    gan = Job("gan", "runs/g", config="g.yaml", overrides=["--seed", "0"], entry_point="generation", resumable=True)
    assert gan.command()[1:] == ["-m", "generation.main", "--config", "g.yaml", "--seed", "0", "--output-dir", "runs/g",
                                 "--resume", "auto"]
    assert Job("plain", "runs/p", overrides=["--epochs", "1"]).command()[1:] == [
        "main_distributed.py", "--epochs", "1", "--output_dir", "runs/p"]
    assert job.shell_command().split()[0] in ("python", ".venv/bin/python")
    assert job.log_path == os.path.join("runs", "x", "seed1.log")


@pytest.mark.parametrize("value, force", [(None, False), ("", False), ("0", False), ("1", True), ("yes", True)])
def test_force_is_anything_but_empty_or_zero(monkeypatch, value, force):
    if value is None:
        monkeypatch.delenv("FORCE", raising=False)
    else:
        monkeypatch.setenv("FORCE", value)
    assert runner.force_requested() is force


def test_finished_jobs_are_reused_and_force_reruns_them(fake_entry_point, capsys):
    job, calls = fake_entry_point
    jobs = [job("a", overrides=["--x", "1"]), job("b")]
    first = run_jobs(jobs, force=False)
    assert calls() == ["a", "b"]
    for one in jobs:
        assert one.finished() and first[one.name]["reused"] is False and first[one.name]["seconds"] >= 0
        assert one.done_record() == {"command": one.shell_command(), "settings_sha256": None,
                                     "seconds": first[one.name]["seconds"]}
    again = run_jobs(jobs, force=False)
    assert calls() == ["a", "b"] and all(record["reused"] for record in again.values())
    assert again["a"]["seconds"] == first["a"]["seconds"]  # reused jobs keep their measured time
    assert "[2/2] b: reused" in capsys.readouterr().out
    run_jobs(jobs, force=True)
    assert calls() == ["a", "b", "a", "b"]


def test_a_finished_job_of_another_command_or_config_is_refused_not_reused(fake_entry_point, tmp_path):
    job, calls = fake_entry_point
    config = tmp_path / "row.yaml"
    config.write_text("# first title\nepochs: 3\n")
    run_jobs([job("a", config=str(config), overrides=["--seed", "0"])], force=False)
    config.write_text("# the title reworded\nepochs: 3  # a comment\n")  # the same settings: reused
    assert run_jobs([job("a", config=str(config), overrides=["--seed", "0"])], force=False)["a"]["reused"]
    for changed in (dict(config=str(config), overrides=["--seed", "1"]), dict(overrides=["--seed", "0"])):
        with pytest.raises(BadInput, match=r"runs/a holds a run of another command or config .* delete or move"):
            run_jobs([job("a", **changed)], force=False)
    config.write_text("epochs: 4\n")
    with pytest.raises(BadInput, match="another command or config"):
        run_jobs([job("a", config=str(config), overrides=["--seed", "0"])], force=False)
    assert calls() == ["a"]  # nothing rerun, nothing deleted
    assert run_jobs([job("a", config=str(config), overrides=["--seed", "0"])], force=True)["a"]["reused"] is False
    # --resume auto continues a run without changing it: a job made resumable since it finished is the same job
    assert run_jobs([job("a", config=str(config), overrides=["--seed", "0"], resumable=True)], force=False)["a"]["reused"]


def test_a_resumable_job_stopped_by_the_runner_counts_its_earlier_seconds(fake_entry_point):
    job, calls = fake_entry_point
    slow = job("slow", overrides=["--sleep", "30"], resumable=True)
    threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    started = time.time()
    with pytest.raises(KeyboardInterrupt):
        run_jobs([slow], force=False)
    assert time.time() - started < 10 and not slow.finished()
    assert 1.0 <= slow.stopped_seconds() <= 10
    quick = job("slow", overrides=["--sleep", "0"], resumable=True)
    seconds = run_jobs([quick], force=False)["slow"]["seconds"]
    assert seconds >= slow.stopped_seconds() and quick.done_record()["seconds"] == seconds


def test_an_interrupted_job_starts_over_unless_resumable(fake_entry_point):
    job, calls = fake_entry_point
    fresh, resumed = job("fresh"), job("resumed", resumable=True)
    for interrupted in (fresh, resumed):
        os.makedirs(interrupted.output_dir)
        open(os.path.join(interrupted.output_dir, "latest.pth"), "w").close()  # no done marker: interrupted
    run_jobs([fresh, resumed], force=False)
    assert not os.path.exists(os.path.join(fresh.output_dir, "latest.pth"))
    assert os.path.exists(os.path.join(resumed.output_dir, "latest.pth"))
    assert written_call(resumed)["argv"][-2:] == ["--resume", "auto"] and "--resume" not in written_call(fresh)["argv"]
    # FORCE starts a resumable job over too
    run_jobs([resumed], force=True)
    assert not os.path.exists(os.path.join(resumed.output_dir, "latest.pth"))


def test_a_job_not_reused_when_finished_runs_every_time(fake_entry_point):
    job, calls = fake_entry_point
    jobs = [job("teacher"), job("student", reuse_finished=False)]
    run_jobs(jobs, force=False)
    records = run_jobs(jobs, force=False)
    assert calls() == ["teacher", "student", "student"]
    assert records["teacher"]["reused"] and not records["student"]["reused"]


def test_a_failing_job_raises_with_its_log_and_leaves_no_marker(fake_entry_point, capsys):
    job, calls = fake_entry_point
    failing = job("bad", overrides=["--fail"])
    with pytest.raises(RunFailed, match=r"bad failed \(exit 3\); its output is in .*bad\.log"):
        run_jobs([failing, job("after")], force=False)
    assert not failing.finished() and calls() == ["bad"]
    tail = capsys.readouterr().err
    assert "line 7" in tail and "line 3" in tail and "line 2" not in tail  # the last LOG_TAIL_LINES lines
    with open(failing.log_path) as handle:
        assert handle.read().count("line") == 8


def test_parallel_jobs_all_finish_with_their_thread_count(fake_entry_point):
    job, calls = fake_entry_point
    jobs = [job(f"j{i}", threads=1) for i in range(3)] + [job("inherits")]
    records = run_jobs(jobs, force=False, workers=2)
    assert sorted(calls()) == ["inherits", "j0", "j1", "j2"] and set(records) == {"j0", "j1", "j2", "inherits"}
    assert [written_call(one)["threads"] for one in jobs[:3]] == ["1", "1", "1"]
    assert written_call(jobs[3])["threads"] == os.environ.get("OMP_NUM_THREADS")


def test_output_shown_on_the_terminal_needs_a_single_worker(fake_entry_point):
    job, _ = fake_entry_point
    with pytest.raises(ValueError):
        run_jobs([job("a")], force=False, workers=2, show_output=True)


def test_epoch_log_reads_every_line(tmp_path):
    (tmp_path / "log.txt").write_text('{"epoch": 0, "val_acc1": 50.0}\n\n{"epoch": 1, "val_acc1": 60.0}\n')
    assert [epoch["val_acc1"] for epoch in runner.epoch_log(str(tmp_path))] == [50.0, 60.0]
