"""Where errors become exit codes. Library code raises (``vkd.errors``); each entry point's ``main()`` is
wrapped in ``entry_point``, which turns an error into one ``error:`` line on stderr and the exit code the
error names (2 bad input, 1 a run that could not go on), a full disk into one line and 1, and Ctrl-C into one
line and 130."""
import functools
import sys
from typing import Callable, NoReturn, TypeVar

from vkd.errors import OUT_OF_SPACE, VkDError

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
Main = TypeVar("Main", bound=Callable)


def fail(message: str, exit_code: int = 2, label: str = "error") -> NoReturn:
    """One line on stderr, then exit: code 2 for bad input, 1 for a run that cannot go on."""
    print(f"{label}: {message}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def entry_point(main: Main) -> Main:
    """``main`` with every ``VkDError`` (and Ctrl-C) turned into one line and its exit code."""

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
            fail(f"no space left to write {error.filename or 'a file'}: free some space, then continue with "
                 "--resume auto (the last checkpoint written is kept)", 1)
        except KeyboardInterrupt:
            fail("interrupted; the last checkpoint written is kept (resume with --resume auto)", EXIT_INTERRUPTED,
                 "stopped")

    return guarded
