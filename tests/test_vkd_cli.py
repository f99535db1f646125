"""vkd.cli: an error becomes one line with its label and exit code; Ctrl-C becomes one line and 130."""
import errno

import pytest

from vkd.cli import EXIT_INTERRUPTED, entry_point
from vkd.errors import BadInput, CheckpointError, RunFailed
from vkd.preemption import EXIT_PREEMPTED, Preempted


@pytest.mark.parametrize("error, code, line", [
    (BadInput("--lr must be > 0"), 2, "error: --lr must be > 0"),
    (CheckpointError("x.pth is truncated"), 2, "error: x.pth is truncated"),
    (RunFailed("a loss became non-finite"), 1, "error: a loss became non-finite"),
    (Preempted("preempted at epoch 1 step 2"), EXIT_PREEMPTED, "stopped: preempted at epoch 1 step 2"),
    (OSError(errno.ENOSPC, "No space left on device", "runs/x/log.txt"), 1,
     "error: no space left to write runs/x/log.txt: free some space, then continue with --resume auto"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), 1, "error: no space left to write a file"),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, "stopped: interrupted; the last checkpoint written is kept"),
])
def test_an_entry_point_turns_an_error_into_one_line_and_its_exit_code(error, code, line, capsys):
    @entry_point
    def main():
        raise error

    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == code
    assert capsys.readouterr().err.strip().splitlines()[0].startswith(line)


def test_other_exceptions_keep_their_traceback_and_results_pass_through():
    @entry_point
    def main(value):
        if value is None:
            raise ZeroDivisionError("a bug")
        if value == "missing":
            raise FileNotFoundError(2, "No such file", "x")
        return value * 2

    assert main(21) == 42
    with pytest.raises(ZeroDivisionError):
        main(None)
    with pytest.raises(FileNotFoundError):  # only a full disk is turned into a line
        main("missing")
