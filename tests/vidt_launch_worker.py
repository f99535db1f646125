"""vidt's main under a launcher, with rank 1 made late, given its own data or signalled alone: what a slow
node does, one with an incomplete copy of the data set, or one whose scheduler stops it first (for
tests/test_vidt_reliability.py).

VIDT_RANK1_DELAY_S: rank 1 waits this many seconds before it looks at the run folder.
VIDT_RANK1_COCO: rank 1 reads this --coco_path instead of the command line's.
VIDT_RANK1_SIGTERM_AFTER: "EPOCH STEP": rank 1 sends itself SIGTERM once it has trained that step.
"""
import os
import signal
import sys
import time

import vidt.engine
import vidt.main
from vkd.progress import Progress


def late(prepare_output_dir, seconds: float):
    def prepare_late(*args, **kwargs):
        time.sleep(seconds)
        return prepare_output_dir(*args, **kwargs)

    return prepare_late


def signalled_after(epoch: int, step: int):
    class SignallingProgress(Progress):
        def update(self, done, fields=""):
            super().update(done, fields)
            if self.header == f"Epoch: [{epoch}]" and done == step:
                os.kill(os.getpid(), signal.SIGTERM)

    return SignallingProgress


if __name__ == "__main__":
    argv = sys.argv[1:]
    if os.environ.get("RANK") == "1":
        vidt.main.prepare_output_dir = late(vidt.main.prepare_output_dir, float(os.environ.get("VIDT_RANK1_DELAY_S", 0)))
        if "VIDT_RANK1_COCO" in os.environ:
            argv += ["--coco_path", os.environ["VIDT_RANK1_COCO"]]  # argparse keeps the last value
        if "VIDT_RANK1_SIGTERM_AFTER" in os.environ:
            vidt.engine.Progress = signalled_after(*map(int, os.environ["VIDT_RANK1_SIGTERM_AFTER"].split()))
    vidt.main.main(argv)
