"""Run folders, shared by the three trees: a new run never destroys an old one (``--overwrite`` moves it
aside), ``args.json`` records every invocation, ``--resume auto`` finds the run's latest checkpoint, and a
resumed run's ``log.txt`` keeps each epoch (or iteration) once."""
import datetime
import glob
import json
import os
import platform
import subprocess
import tempfile
import warnings
from typing import Dict, Optional, Sequence

from vkd.distributed import main_process_decides
from vkd.errors import BadInput

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS_FILE, LOG, TENSORBOARD = "args.json", "log.txt", "tensorboard"
# What a run of any of the three trees leaves in its folder; any of them means the folder holds a run.
# Classification writes latest/best.pth.tar, ep*.pth.tar and teacher.pth; generation latest/best.pth,
# results.json and samples/; detection (DETR's names) checkpoint*.pth and eval/.
RUN_FILES = (ARGS_FILE, LOG, TENSORBOARD, "latest.pth*", "best.pth*", "ep*.pth.tar", "teacher.pth", "results.json",
             "samples", "checkpoint*.pth", "eval")


def _git(*arguments: str) -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", REPO_DIR, *arguments], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_state() -> Dict[str, object]:
    """The commit of this code and whether the working tree differs from it (None outside a git checkout)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": _git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status)}


def cpu_model() -> str:
    """The CPU's model name (the last digits of CPU results depend on it)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write_json(path: str, content: dict) -> None:
    with open(path, "w") as handle:
        json.dump(content, handle, indent=1)
        handle.write("\n")


def require_writable_folder(folder: str, what: str) -> None:
    """Creates ``folder`` if needed and writes a file in it, so that a file in the way, a read-only file system
    or missing permissions are one line naming ``what`` before any work, not a traceback after it."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise BadInput(f"{what} {folder} is a file, not a folder: choose another folder")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise BadInput(f"{what} {folder} cannot be written ({error.strerror or error}): choose another folder") from None


def _run_files_in(output_dir: str, run_files: Sequence[str]):
    return sorted({os.path.basename(found) for pattern in run_files
                   for found in glob.glob(os.path.join(glob.escape(output_dir), pattern))})


def prepare_output_dir(output_dir: str, resume: Optional[str], overwrite: bool, is_main: bool,
                       run_files: Sequence[str] = RUN_FILES) -> Optional[str]:
    """Make sure a new run cannot destroy an old one in ``output_dir``; call it on every process.

    ``resume``: the run's --resume, '' or None for a new run, 'auto' to continue the run in ``output_dir``, or
    the path of the checkpoint it continues. A folder that holds a run (any of ``run_files``, glob patterns)
    is refused unless that run is the one continued (``resume`` is 'auto' or a file of ``output_dir``), or
    ``overwrite`` is set, which moves the old folder aside and returns its new path: a resume goes on in the
    folder of the run it resumes, or into an empty one. Only the main process looks at the folder, and every
    process waits for its decision: a slower rank must not see the ``args.json`` that the main process writes
    right after, and take it for an old run.
    """
    return main_process_decides(lambda: _moved_aside(output_dir, resume, overwrite, run_files), is_main)


def _continues_the_run_in(output_dir: str, resume: Optional[str]) -> bool:
    if resume == "auto":
        return True
    return bool(resume) and os.path.realpath(os.path.dirname(os.path.abspath(resume))) == os.path.realpath(output_dir)


def _moved_aside(output_dir: str, resume: Optional[str], overwrite: bool, run_files: Sequence[str]) -> Optional[str]:
    if not output_dir:
        return None
    existing = _run_files_in(output_dir, run_files) if os.path.isdir(output_dir) else []
    if not existing or _continues_the_run_in(output_dir, resume):
        return None
    if not overwrite:
        held = f"output folder {output_dir} already holds a run ({', '.join(existing[:4])})"
        if resume:
            raise BadInput(f"{held}, not the run of {resume}: a resume goes on in the folder of the run it resumes "
                           f"or into an empty one (--resume auto continues the run in {output_dir}; --overwrite "
                           f"moves it aside)")
        raise BadInput(f"{held}: continue it with --resume auto, choose another output folder, or pass --overwrite "
                       f"to move the old run aside")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = f"{os.path.normpath(output_dir)}.previous-{stamp}"
    os.replace(output_dir, aside)
    return aside


def record_invocation(args, argv: Sequence[str], world_size: int, start_epoch: int = 0,
                      changes: Optional[dict] = None, **first_record) -> None:
    """``args.json``: the resolved arguments, code version and ``first_record`` (e.g. the effective lr, the
    teacher's weights) of the run's first invocation, and one entry per invocation (a resume appends;
    nothing is replaced), with the ``changes`` a resume honoured (e.g. a new end of the run)."""
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, ARGS_FILE)
    invocation = dict(command=list(argv), **git_state(), processes=world_size, start_epoch=start_epoch,
                      started=datetime.datetime.now().isoformat(timespec="seconds"))
    if changes:
        invocation["changes"] = changes
    content = None
    if os.path.isfile(path):
        try:
            with open(path) as handle:
                content = json.load(handle)
        except (OSError, ValueError):
            kept = _free_name(f"{path}.unreadable")  # kept for a person to read, never silently dropped
            os.replace(path, kept)
            warnings.warn(f"{path} could not be read: kept as {kept}, and a new {ARGS_FILE} starts here")
    if not isinstance(content, dict):
        content = dict(args=vars(args), **git_state(), command=list(argv), processes=world_size, **first_record,
                       invocations=[])
    content.setdefault("invocations", []).append(invocation)
    temporary = f"{path}.tmp"
    write_json(temporary, content)
    os.replace(temporary, path)


def _free_name(path: str) -> str:
    """``path``, or the first of ``path.1``, ``path.2``... that does not exist yet."""
    candidate, number = path, 0
    while os.path.lexists(candidate):
        number += 1
        candidate = f"{path}.{number}"
    return candidate


def _logged_counter(line: str, key: str) -> Optional[int]:
    """The epoch (or other ``key``) of a log.txt line; None for a last line torn by a kill mid-write."""
    if not line.endswith("\n"):
        return None
    try:
        return json.loads(line)[key]
    except ValueError:
        return None


def trim_log(path: str, start_epoch: int, key: str = "epoch") -> None:
    """Keeps only the log.txt lines of epochs before ``start_epoch``, where training (re)starts.

    A run killed after writing an epoch's line but before its latest.pth.tar redoes that epoch,
    whose line must then appear once; a run that starts over replaces the log of the one before.
    """
    if not os.path.isfile(path):
        return
    with open(path) as handle:
        lines = handle.readlines()
    kept = []
    for line in lines:
        epoch = _logged_counter(line, key)
        if epoch is not None and epoch < start_epoch:
            kept.append(line)
    if len(kept) < len(lines):
        temporary = f"{path}.tmp"
        with open(temporary, "w") as handle:
            handle.writelines(kept)
        os.replace(temporary, path)


def refuse_a_different_run(args, saved: dict, flags: Sequence[str], saved_processes: Optional[int],
                           processes: int, path: str, new_run: str) -> None:
    """A resume continues the run that wrote ``path`` (with the arguments ``saved``): a change of one of
    ``flags`` (as spelled on the command line) or of the number of processes is refused in one line naming
    both values and ``new_run``, the way to train the weights with other settings instead."""
    if saved_processes is not None and saved_processes != processes:
        raise BadInput(f"{path} was trained on {saved_processes} process(es), this resume has {processes}: a resume "
                       f"continues the same run (the global batch and the data order depend on it); {new_run}")
    for flag in flags:
        name, value = flag.lstrip("-").replace("-", "_"), getattr(args, flag.lstrip("-").replace("-", "_"))
        # Arguments come back from a checkpoint as saved: tuples as lists.
        if name in saved and saved[name] != (list(value) if isinstance(value, tuple) else value):
            raise BadInput(f"{flag} {_shown(value)} but {path} was trained with {_shown(saved[name])}: a resume "
                           f"continues the same run; {new_run}")


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def resolve_resume(args, latest_name: str) -> Optional[str]:
    """``--resume``'s file: the path given, or with 'auto' the run folder's latest checkpoint if there is one."""
    if args.resume != "auto":
        return args.resume or None
    latest = os.path.join(args.output_dir, latest_name)
    return latest if os.path.isfile(latest) else None
