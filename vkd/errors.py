"""The one error hierarchy of the three trees.

Library code raises these; only an entry point's ``main()`` (through ``vkd.cli.entry_point``) turns
them into one ``error:`` line and an exit code: 2 for bad input (found before or during work: a flag,
a file, a data set), 1 for a run that could not go on (a non-finite loss, a dead rank, a full disk).
"""
import errno

OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, a full quota


class VkDError(Exception):
    """Base of every error this project raises on purpose; ``str()`` is one line."""

    exit_code = 1
    label = "error"  # what the entry point's one line starts with


class BadInput(VkDError, ValueError):
    """A flag, a path, a file or the launcher's environment is wrong; the message names the fix."""

    exit_code = 2


class CheckpointError(BadInput):
    """A checkpoint that is missing, unreadable, unsafe, or of the wrong architecture."""


class DatasetError(BadInput):
    """Bad data input: a missing folder, an empty class, an unknown name..."""


class RunFailed(VkDError, RuntimeError):
    """A run that started but cannot go on; what was saved before is kept."""

    exit_code = 1
