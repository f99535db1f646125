"""The one job runner of the experiments.

A job is one run of an entry point (``main_distributed.py``, or ``python -m generation.main``): a config
file plus overrides, writing to its own output folder. A job that finished holds DONE_MARKER (its command,
a checksum of its config's settings and its wall seconds, written only after the process exited cleanly)
and is reused while its command and settings stay the same; FORCE=1 in the environment reruns it. A job
that was interrupted starts again from scratch, or, if it is resumable, continues with ``--resume auto``;
the seconds of a resumable job that the runner stopped count towards its wall time.
"""
import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from vkd.cli import ENTRY_POINTS
from vkd.config import OneLineErrorParser, config_settings
from vkd.errors import BadInput, RunFailed
from vkd.runs import cpu_model, require_writable_folder, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DONE_MARKER = "job_done.json"
STOPPED_MARKER = "job_stopped.json"  # the seconds a resumable job ran before the runner stopped it
LOG_TAIL_LINES = 5
POLL_SECONDS = 0.2
RESUME = ["--resume", "auto"]  # what a resumable job's command ends with


def driver_parser(doc: str) -> argparse.ArgumentParser:
    """A driver's command line: ``--help`` prints ``doc`` (its module's docstring), a bad flag is one line."""
    return OneLineErrorParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def require_writable_results(folder: str) -> None:
    """Before the runs: a results folder that cannot be written is one line now, not a traceback at the end."""
    require_writable_folder(folder, "results folder")


def force_requested() -> bool:
    """FORCE set to anything but '' or '0': rerun finished jobs and rebuild exported data."""
    return os.environ.get("FORCE", "") not in ("", "0")


def shell_command(command: Sequence[str]) -> str:
    """``command`` as a shell line to run from the repository root, naming the interpreter as a reader has it
    (``make`` sets up ``.venv``), not by this run's absolute path."""
    interpreter = os.path.join(".venv", "bin", "python") if os.path.basename(sys.prefix) == ".venv" else "python"
    return shlex.join([interpreter, *command[1:]])


def thread_environment(threads: int) -> Dict[str, str]:
    """Environment of a job computing with ``threads`` threads. The result of a parallel sum depends on how
    it is split, so a fixed count keeps runs repeatable; the libraries below torch read their own variable."""
    environment = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    # Threads waiting at the end of a parallel region sleep instead of spinning. Same numbers; on cores shared
    # with other jobs a spinning thread steals the time its partner needs (a step took 6-9x longer).
    environment["OMP_WAIT_POLICY"] = "PASSIVE"
    return environment


def _defining(arguments: List[str]) -> List[str]:
    """A job's arguments without the runner's ``--resume auto``, which continues a run without changing it."""
    return arguments[:-len(RESUME)] if arguments[-len(RESUME):] == RESUME else arguments


def hardware_description() -> str:
    return f"{len(os.sched_getaffinity(0))} cores of {cpu_model()}, no GPU"


@dataclass(frozen=True)
class Job:
    name: str
    output_dir: str
    config: Optional[str] = None
    overrides: Sequence[str] = ()
    entry_point: str = "classification"
    resumable: bool = False
    reuse_finished: bool = True  # False: run again even when finished (without FORCE)
    threads: Optional[int] = None  # a fixed thread count (see thread_environment); None inherits

    def environment(self) -> Dict[str, str]:
        return {**os.environ, **(thread_environment(self.threads) if self.threads else {})}

    def command(self) -> List[str]:
        program, output_flag = ENTRY_POINTS[self.entry_point]
        config = ["--config", self.config] if self.config else []
        resume = RESUME if self.resumable else []
        return [sys.executable, *program, *config, *self.overrides, output_flag, self.output_dir, *resume]

    def shell_command(self) -> str:
        return shell_command(self.command())

    @property
    def log_path(self) -> str:
        """Where the job's stdout and stderr go, beside (not in) its output folder."""
        return os.path.normpath(self.output_dir) + ".log"

    def settings_sha256(self) -> Optional[str]:
        """A checksum of what the config file sets over its base chain (not of its comments); None without one."""
        if self.config is None:
            return None
        settings = json.dumps(config_settings(self.config), sort_keys=True, default=str)
        return hashlib.sha256(settings.encode()).hexdigest()

    def finished(self) -> bool:
        return os.path.isfile(os.path.join(self.output_dir, DONE_MARKER))

    def done_record(self) -> dict:
        """{"command", "settings_sha256", "seconds"} of the finished job. A job finished with another command or
        other config settings than it has now is refused (BadInput), so old results never pass for new ones."""
        with open(os.path.join(self.output_dir, DONE_MARKER)) as handle:
            record = json.load(handle)
        same_command = _defining(shlex.split(record.get("command", ""))[1:]) == _defining(self.command()[1:])
        if not same_command or record.get("settings_sha256") != self.settings_sha256():
            raise BadInput(f"{self.output_dir} holds a run of another command or config than "
                           f"`{self.shell_command()}`: delete or move that folder to run it again")
        return record

    def stopped_seconds(self) -> float:
        """The seconds this job ran before the runner stopped it (0 if it never did)."""
        path = os.path.join(self.output_dir, STOPPED_MARKER)
        if not os.path.isfile(path):
            return 0.0
        with open(path) as handle:
            return json.load(handle)["seconds"]

    def record_stopped(self, seconds: float) -> None:
        write_json(os.path.join(self.output_dir, STOPPED_MARKER), {"seconds": round(self.stopped_seconds() + seconds, 1)})


def epoch_log(output_dir: str) -> List[dict]:
    """The per-epoch records a finished ``main_distributed.py`` job wrote to its log.txt."""
    with open(os.path.join(output_dir, "log.txt")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _log_tail(path: str) -> str:
    with open(path) as handle:
        return "\n".join(handle.read().splitlines()[-LOG_TAIL_LINES:])


def run_jobs(jobs: Sequence[Job], force: bool, workers: int = 1, show_output: bool = False,
             describe: Optional[Callable[[Job], str]] = None) -> Dict[str, dict]:
    """Run the ``jobs`` that are not finished (all of them with ``force``), ``workers`` at a time, from the
    repository root; return each job's done record ({"command", "seconds"}) with "reused" added, by name.

    ``show_output`` (one worker only) lets a job print to the terminal; otherwise its output goes to its
    log_path. After each job a progress line gives ``describe(job)`` and an ETA. A job that fails stops the
    others and raises RunFailed.
    """
    if show_output and workers != 1:
        raise ValueError("show_output needs a single worker: parallel jobs would interleave their output")
    records: Dict[str, dict] = {}
    pending: List[Job] = []
    for job in jobs:
        if job.finished() and job.reuse_finished and not force:
            records[job.name] = dict(job.done_record(), reused=True)
        else:
            pending.append(job)
    started = time.time()

    def report_progress(job: Job) -> None:
        record = records[job.name]
        # Reused jobs keep their measured wall time, so the ETA is right after a restart too.
        left = len(jobs) - len(records)
        eta = statistics.mean(r["seconds"] for r in records.values()) * left / workers / 60
        took = "reused (FORCE=1 reruns)" if record["reused"] else f"{record['seconds']:.0f} s"
        print(f"[{len(records)}/{len(jobs)}] {job.name}: {took}" + (f", {describe(job)}" if describe else "")
              + f"  elapsed {(time.time() - started) / 60:.1f} min, eta {eta:.1f} min", flush=True)

    for job in jobs:
        if job.name in records:
            report_progress(job)
    running: Dict[str, tuple] = {}
    # A SIGTERM to the driver (a cluster, `kill`) ends it like Ctrl-C: the finally below stops the running jobs,
    # which checkpoint and are continued by the next call.
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                if force or not job.resumable:
                    shutil.rmtree(job.output_dir, ignore_errors=True)
                os.makedirs(os.path.dirname(job.log_path) or ".", exist_ok=True)
                print(f"start {job.name}: {job.shell_command()}" + ("" if show_output else f"  (log: {job.log_path})"),
                      flush=True)
                log = None if show_output else open(job.log_path, "w")
                process = subprocess.Popen(job.command(), cwd=ROOT, env=job.environment(), stdout=log,
                                           stderr=None if show_output else subprocess.STDOUT)
                running[job.name] = (job, process, log, time.time())
            time.sleep(POLL_SECONDS)
            for name, (job, process, log, job_started) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                if log is not None:
                    log.close()
                if process.returncode != 0:
                    if not show_output:
                        print(f"last lines of {job.log_path}:\n{_log_tail(job.log_path)}", file=sys.stderr)
                    raise RunFailed(f"{name} failed (exit {process.returncode})"
                                    + ("" if show_output else f"; its output is in {job.log_path}"))
                os.makedirs(job.output_dir, exist_ok=True)
                record = {"command": job.shell_command(), "settings_sha256": job.settings_sha256(),
                          "seconds": round(job.stopped_seconds() + time.time() - job_started, 1)}
                write_json(os.path.join(job.output_dir, DONE_MARKER), record)
                records[name] = dict(record, reused=False)
                report_progress(job)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        for job, process, log, job_started in running.values():
            process.terminate()
            process.wait()
            if log is not None:
                log.close()
            if job.resumable and os.path.isdir(job.output_dir):
                job.record_stopped(time.time() - job_started)
    return {job.name: records[job.name] for job in jobs}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def write_report(folder: str, json_name: str, content: dict, page: Callable[[dict], str],
                 plot: Optional[Callable[[dict, str], None]] = None, plot_name: Optional[str] = None) -> None:
    """``json_name`` (the numbers), then the plot (``plot_name``, by default ``json_name`` as .png) and the
    README page drawn from them."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, json_name), "w") as handle:
        json.dump(content, handle, indent=2)
    if plot is not None:
        plot(content, os.path.join(folder, plot_name or os.path.splitext(json_name)[0] + ".png"))
    with open(os.path.join(folder, "README.md"), "w") as handle:
        handle.write(page(content))
