"""What a run folder records about the run: args.json with the resolved arguments, the git commit and the
command line, as the classification runs of this repository write it.

Kept to one function, ``write_run_args``, so that it can be pointed at the repository-wide run record.
"""
import json
import os
import subprocess
import sys
from typing import Optional, Sequence

REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", REPO_DIR, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def save_json(path: str, payload) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1)
        handle.write("\n")


def write_run_args(output_dir: str, args, argv: Sequence[str] = ()) -> None:
    """args.json: the resolved arguments, the git commit and the command (``sys.argv`` by default)."""
    command = [sys.executable, *sys.argv] if not argv else list(argv)
    save_json(os.path.join(output_dir, "args.json"),
              {"args": vars(args), "git_commit": git_commit(), "command": command,
               "processes": getattr(args, "world_size", 1)})
