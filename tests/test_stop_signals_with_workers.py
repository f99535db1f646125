"""A stop signal sent to a run's whole process group (`timeout`, `kill -- -PGID`, a scheduler signalling every
process of a job step) reaches its DataLoader workers too: they ignore it and leave it to the main process,
which stops at a step boundary with a mid-epoch checkpoint (SIGTERM, SIGUSR1: exit 124) or one line (SIGINT:
exit 130), instead of failing on a worker killed under it."""
import os
import signal
import sys

import pytest
import torch
from conftest import TEACHER
from test_preemption import interrupted
from test_reliability import main_command
from test_vidt import SMALL_IMAGE_FLAGS, parse_args

import vidt.main
from vidt.tools.make_synthetic_coco import make_synthetic_coco
from vkd.checkpoints import safe_torch_load
from vkd.data import loaders
from vkd.preemption import EXIT_PREEMPTED

SIGNALS_LEFT_TO_THE_MAIN_PROCESS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class HandlerOfEachSignal(torch.utils.data.Dataset):
    """Each item: whether the process reading it ignores each stop signal and quiets its batch server's
    failures, and a class index."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        ignored = [signal.getsignal(number) == signal.SIG_IGN for number in SIGNALS_LEFT_TO_THE_MAIN_PROCESS]
        quieted = getattr(sys.excepthook, "func", None) is loaders._quiet_when_a_batch_receiver_leaves
        return torch.tensor(ignored + [quieted]), 0


def test_the_loaders_workers_ignore_the_stop_signals():
    dataset = HandlerOfEachSignal()
    val = loaders.val_loader(dataset, batch_size=2, num_workers=2, pin_memory=False, sharded=False)
    train = loaders.train_loader(dataset, torch.utils.data.SequentialSampler(dataset), batch_size=2, num_workers=2,
                                 pin_memory=False, keep_even=False)
    for loader in (val, train):
        ignored = torch.cat([samples for samples, _, _ in loader])
        assert ignored.shape == (4, 4) and bool(ignored.all())
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # this process still handles them
    assert getattr(sys.excepthook, "func", None) is not loaders._quiet_when_a_batch_receiver_leaves


def raised_in(filename: str, error: type):
    """The ``sys.excepthook`` arguments for ``error`` raised by code compiled as ``filename``."""
    try:
        exec(compile(f"raise {error.__name__}()", filename, "exec"))
    except error as caught:
        return error, caught, caught.__traceback__


@pytest.mark.parametrize("filename, error, printed", [
    (os.path.join("lib", "multiprocessing", "resource_sharer.py"), EOFError, False),
    (os.path.join("lib", "multiprocessing", "resource_sharer.py"), ConnectionResetError, False),
    (os.path.join("lib", "multiprocessing", "resource_sharer.py"), ValueError, True),
    (os.path.join("lib", "multiprocessing", "connection.py"), EOFError, True)])
def test_a_worker_drops_only_the_failure_of_its_batch_server_on_a_closed_connection(filename, error, printed):
    seen = []
    loaders._quiet_when_a_batch_receiver_leaves(lambda *arguments: seen.append(arguments), *raised_in(filename, error))
    assert len(seen) == int(printed)


def test_the_detection_loaders_ignore_the_stop_signals_in_their_workers(tmp_path):
    coco = make_synthetic_coco(tmp_path, num_train=2, num_val=1, size=(64, 48))
    args = parse_args(*SMALL_IMAGE_FLAGS, "--coco_path", str(coco), "--batch_size", "1")
    train, val, _ = vidt.main.make_loaders(args, eval_only=False)
    assert train.worker_init_fn is val.worker_init_fn is loaders.init_worker


@pytest.mark.parametrize("signal_number, exit_code", [
    pytest.param(signal.SIGTERM, EXIT_PREEMPTED, marks=pytest.mark.slow),
    pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_a_signal_to_the_process_group_with_workers_stops_the_run_as_without(train_flags, tmp_path, signal_number,
                                                                              exit_code):
    output_dir = tmp_path / "run"
    flags = train_flags + ["--epochs", 2, "--num_workers", 2, "--print-freq", 1, "--output_dir", output_dir]
    assert flags[flags.index("--teacher") + 1] == TEACHER
    # Epoch 1 for Ctrl-C, so that there is a checkpoint to keep.
    after = r"^Epoch: \[0\] \[1/4\]" if signal_number == signal.SIGTERM else r"^Epoch: \[1\] \[1/4\]"
    code, output = interrupted(main_command(flags), output_dir, after, signal_number)
    assert code == exit_code, output[-3000:]
    assert "Traceback" not in output and "DataLoader worker" not in output, output[-4000:]
    assert len([line for line in output.splitlines() if line.startswith("stopped: ")]) == 1
    saved = safe_torch_load(str(output_dir / "latest.pth.tar"))
    if signal_number == signal.SIGTERM:  # stopped at a later step of epoch 0, which it saved
        assert saved["mid_epoch"]["epoch"] == 0 and saved["mid_epoch"]["ranks"][0]["step"] in (1, 2, 3)
    else:  # Ctrl-C keeps the last checkpoint written, the end of epoch 0
        assert saved["epoch"] == 0 and "mid_epoch" not in saved


EXITS_WITH_A_LIVE_WORKER = """
import torch
from vkd.data import loaders

class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        return torch.tensor([index]), 0

loader = loaders.val_loader(Numbers(), batch_size=2, num_workers=1, pin_memory=False, sharded=False)
iterator = iter(loader)
next(iterator)
KEPT = iterator  # alive at exit, as when an error's traceback still holds the loop that iterated
print("exiting", flush=True)
"""


def test_a_process_that_exits_with_a_live_worker_is_not_held_by_it(tmp_path):
    # At exit multiprocessing ends its daemonic children (the workers) with SIGTERM, which they ignore: the
    # process must end them otherwise, or wait for them forever.
    import subprocess
    import sys

    from conftest import REPO
    result = subprocess.run([sys.executable, "-c", EXITS_WITH_A_LIVE_WORKER], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout == "exiting\n", result.stderr[-2000:]
