"""vkd.saver: the one checkpoint saver of the three trees (latest, best, every N, preempted, non-finite weights
refused, room checked, atomic writes), and the file names each tree gives it."""
import argparse
import errno
import os

import pytest
import torch

import checkpoint as classification_checkpoint
import vkd.checkpoints
from generation import checkpointing as generation_checkpointing
from vidt.util import checkpoint as detection_checkpoint
from vkd import saver as saving
from vkd.errors import BadInput, RunFailed

FINITE = [{"weight": torch.ones(3)}]
NON_FINITE = [{"weight": torch.tensor([1.0, float("nan")])}]


def content(step: int) -> dict:
    return {"step": step, "weights": torch.full((2,), float(step))}


def saved(folder) -> dict:
    return {name: torch.load(os.path.join(folder, name), weights_only=True)["step"] for name in sorted(os.listdir(folder))}


def every_n_saver(folder, **fields):
    return saving.CheckpointSaver(str(folder), "latest.pth", "best.pth", kept="kept{done}-{last:03}.pth",
                                  keep_every=(3, 4), **fields)


def test_latest_every_save_best_on_improvement_and_a_kept_copy_every_n(tmp_path):
    saver = every_n_saver(tmp_path)
    for done, improved in [(1, True), (2, False), (3, True), (4, False), (5, False)]:
        saver.save(content(done), done, FINITE, improved=improved)
    assert saved(tmp_path) == {"latest.pth": 5, "best.pth": 3, "kept3-002.pth": 3, "kept4-003.pth": 4}


def test_the_record_comes_first_and_latest_last(tmp_path, monkeypatch):
    order = []
    write = vkd.checkpoints.save_atomically
    monkeypatch.setattr(saving, "save_atomically", lambda obj, path: order.append(os.path.basename(path))
                        or write(obj, path))
    every_n_saver(tmp_path).save(content(4), 4, FINITE, improved=True, before=lambda: order.append("log line"))
    assert order == ["log line", "best.pth", "kept4-003.pth", "latest.pth"]


@pytest.mark.parametrize("is_main", [True, False])
def test_non_finite_weights_are_never_saved_on_any_rank(tmp_path, is_main):
    saver = every_n_saver(tmp_path, is_main=is_main, unit="iteration")
    logged = []
    with pytest.raises(RunFailed, match="weights became non-finite after 4 iteration\\(s\\); latest.pth was "
                                        "left as it was"):
        saver.save(content(4), 4, FINITE + NON_FINITE, improved=True, before=lambda: logged.append(1))
    with pytest.raises(RunFailed, match="non-finite by epoch 2 step 5"):
        saver.save_preempted(content(4), NON_FINITE, "epoch 2 step 5")
    with pytest.raises(RunFailed, match="non-finite before the best checkpoint"):
        saver.save_best(content(4), NON_FINITE)
    assert os.listdir(tmp_path) == [] and logged == []


def test_only_the_main_process_writes(tmp_path):
    other = every_n_saver(tmp_path, is_main=False)
    other.save(content(3), 3, FINITE, improved=True, before=lambda: pytest.fail("a record of another rank"))
    other.save_best(content(3), FINITE)
    other.save_preempted(content(3), FINITE, "epoch 3 step 1")
    assert os.listdir(tmp_path) == []


def test_a_preempted_save_writes_latest_and_every_rank_waits_for_it(tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(saving, "wait_for_every_rank", lambda: waits.append(1))
    for is_main in (True, False):
        every_n_saver(tmp_path, is_main=is_main).save_preempted(content(7), FINITE, "epoch 7 step 2")
    assert saved(tmp_path) == {"latest.pth": 7} and waits == [1, 1]


def test_a_failed_write_keeps_the_previous_file_whole(tmp_path, monkeypatch):
    saver = every_n_saver(tmp_path)
    saver.save(content(1), 1, FINITE)

    def disk_full(obj, handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vkd.checkpoints.torch, "save", disk_full)
    with pytest.raises(RunFailed, match="no space left"):
        saver.save(content(2), 2, FINITE)
    monkeypatch.undo()
    assert saved(tmp_path) == {"latest.pth": 1}


def test_the_room_check_creates_the_folder_and_refuses_one_too_small(tmp_path, monkeypatch):
    folder = tmp_path / "new" / "run"
    every_n_saver(folder).require_room(2 ** 20)
    assert folder.is_dir()
    monkeypatch.setattr(vkd.checkpoints, "_free_bytes", lambda folder: 3 * 2 ** 20)
    with pytest.raises(BadInput, match="3 MiB free, and the run needs 4 MiB for 2 checkpoints of 2 MiB"):
        every_n_saver(folder).require_room(2 * 2 ** 20)


def test_a_checkpoint_holds_the_weights_with_the_optimizers_moments_and_the_rest():
    model = torch.nn.Linear(10, 10)  # 110 fp32 values: 440 bytes
    ema = {"weight": torch.zeros(5, dtype=torch.float64)}  # 40 bytes
    adam = torch.optim.AdamW(model.parameters())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert saving.estimated_checkpoint_bytes(adam, model.state_dict(), ema) == 440 * 3 + 40
    assert saving.estimated_checkpoint_bytes(sgd, model.state_dict()) == 440 * 2


def save_epochs(saver, epochs: int) -> None:
    os.makedirs(saver.folder)
    for epoch in range(epochs):
        saver.save(content(epoch), epoch + 1, FINITE, improved=saver.best is not None and epoch == 1)


def test_each_tree_writes_the_files_it_always_wrote(tmp_path):
    """The names resume and the released files rely on: classification latest/best/ep{N}.pth.tar, detection
    checkpoint.pth and checkpoint{epoch:04}.pth every --lr_drop and every 100 epochs, generation latest/best.pth."""
    classification = argparse.Namespace(output_dir=str(tmp_path / "classification"), checkpoint_freq=2)
    save_epochs(classification_checkpoint.checkpoint_saver(classification), 5)
    assert saved(classification.output_dir) == {"best.pth.tar": 1, "ep2.pth.tar": 1, "ep4.pth.tar": 3,
                                                "latest.pth.tar": 4}
    detection = argparse.Namespace(output_dir=str(tmp_path / "detection"), lr_drop=40)
    save_epochs(detection_checkpoint.checkpoint_saver(detection), 120)
    assert saved(detection.output_dir) == {"checkpoint.pth": 119, "checkpoint0039.pth": 39,
                                           "checkpoint0079.pth": 79, "checkpoint0099.pth": 99,
                                           "checkpoint0119.pth": 119}
    generation = argparse.Namespace(output_dir=str(tmp_path / "generation"))
    save_epochs(generation_checkpointing.checkpoint_saver(generation), 3)
    assert saved(generation.output_dir) == {"best.pth": 1, "latest.pth": 2}
