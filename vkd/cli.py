"""Where errors become exit codes. Library code raises (``vkd.errors``); each entry point's ``main()`` is
wrapped in ``entry_point``, which turns an error into one ``error:`` line on stderr and the exit code the
error names (2 bad input, 1 a run that could not go on), a full disk into one line and 1, and Ctrl-C into one
line and 130. ``ENTRY_POINTS`` says how each tree's entry point is run, for the launchers that run them."""
import functools
import sys
from typing import Callable, NamedTuple, NoReturn, Optional, Tuple, TypeVar

from vkd.errors import OUT_OF_SPACE, VkDError

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
# What a training run keeps after a full disk or Ctrl-C; entry points that keep something else say so.
TRAINING_AFTER_FULL_DISK = "then continue with --resume auto (the last checkpoint written is kept)"
TRAINING_AFTER_INTERRUPT = "the last checkpoint written is kept (resume with --resume auto)"
Main = TypeVar("Main", bound=Callable)


class EntryPoint(NamedTuple):
    program: Tuple[str, ...]  # what follows the interpreter, from the repository root
    output_flag: str  # its flag of the output folder (each tree accepts --output_dir and --output-dir)


# Each tree's entry point, as run_with_submitit.py and experiments' runner start it in a child process: the one
# map of trees to commands (data, so that neither imports an entry point, nor the core a tree).
ENTRY_POINTS = {
    "classification": EntryPoint(("main_distributed.py",), "--output_dir"),
    "detection": EntryPoint(("-m", "vidt.main"), "--output_dir"),
    "generation": EntryPoint(("-m", "generation.main"), "--output-dir"),
}


def fail(message: str, exit_code: int = 2, label: str = "error") -> NoReturn:
    """One line on stderr, then exit: code 2 for bad input, 1 for a run that cannot go on."""
    print(f"{label}: {message}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def entry_point(main: Optional[Main] = None, *, after_full_disk: str = TRAINING_AFTER_FULL_DISK,
                after_interrupt: str = TRAINING_AFTER_INTERRUPT) -> Main:
    """``main`` with every ``VkDError`` (and Ctrl-C) turned into one line and its exit code.

    ``@entry_point`` words a full disk and Ctrl-C for training; ``@entry_point(after_full_disk=...,
    after_interrupt=...)`` for an entry point that keeps something else (an export, nothing at all).
    """
    if main is None:
        return functools.partial(entry_point, after_full_disk=after_full_disk, after_interrupt=after_interrupt)

    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except VkDError as error:
            fail(str(error), error.exit_code, error.label)
        except OSError as error:
            if error.errno not in OUT_OF_SPACE:
                raise
            # Any write (a log line, a JSON record, tensorboard); checkpoints are replaced atomically.
            fail(f"no space left to write {error.filename or 'a file'}: free some space, {after_full_disk}", 1)
        except KeyboardInterrupt:
            fail(f"interrupted; {after_interrupt}", EXIT_INTERRUPTED, "stopped")

    return guarded
