"""Console output of a run on several processes: rank 0 prints, the others print errors only."""
import sys


def setup_for_distributed_printing(is_master: bool) -> None:
    """Silence print() on every process but rank 0 (force=True still prints). Prints to stderr pass: an
    error line of any rank must reach the terminal."""
    import builtins
    builtin_print = builtins.print

    def rank_aware_print(*args, **kwargs):
        if kwargs.pop("force", False) or is_master or kwargs.get("file") is sys.stderr:
            builtin_print(*args, **kwargs)

    builtins.print = rank_aware_print
