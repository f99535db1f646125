"""vkd.runs (run folders, args.json, log trimming, resume resolution) and vkd.checkpoints (weights-only and
strict loading with hints, atomic saving, room for checkpoints, tensor bytes)."""
import argparse
import json
import os
import time

import pytest
import torch
import torch.nn as nn

from vkd import checkpoints, runs
from vkd.errors import BadInput, CheckpointError


def test_a_folder_holding_a_run_is_refused_continued_or_moved_aside(tmp_path):
    folder = tmp_path / "run"
    assert runs.prepare_output_dir(str(folder), resume="", overwrite=False, is_main=True) is None
    folder.mkdir()
    (folder / "notes.md").write_text("not a run file")
    assert runs.prepare_output_dir(str(folder), resume="", overwrite=False, is_main=True) is None
    (folder / "checkpoint0004.pth").write_bytes(b"weights")
    with pytest.raises(BadInput, match=r"already holds a run \(checkpoint0004.pth\)"):
        runs.prepare_output_dir(str(folder), resume="", overwrite=False, is_main=True)
    assert runs.prepare_output_dir(str(folder), resume="auto", overwrite=False, is_main=True) is None
    aside = runs.prepare_output_dir(str(folder), resume="", overwrite=True, is_main=True)
    assert os.path.basename(aside).startswith("run.previous-") and not folder.exists()
    assert sorted(os.listdir(aside)) == ["checkpoint0004.pth", "notes.md"]


def test_args_json_keeps_the_first_record_and_appends_each_invocation(tmp_path):
    args = argparse.Namespace(output_dir=str(tmp_path), lr=1e-3)
    runs.record_invocation(args, ["--lr", "1e-3"], world_size=1, lr_effective=1e-3)
    args.lr = 5.0  # a later invocation cannot rewrite the first record
    runs.record_invocation(args, ["--resume", "auto"], world_size=1, start_epoch=2,
                           changes={"epochs": {"from": 2, "to": 4}})
    content = json.loads((tmp_path / runs.ARGS_FILE).read_text())
    assert content["args"]["lr"] == 1e-3 and content["lr_effective"] == 1e-3
    assert [entry["start_epoch"] for entry in content["invocations"]] == [0, 2]
    assert "changes" not in content["invocations"][0]
    assert content["invocations"][1]["changes"] == {"epochs": {"from": 2, "to": 4}}


def test_a_resumed_log_keeps_each_earlier_epoch_once(tmp_path):
    log = tmp_path / runs.LOG
    log.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2}\n{"epo')  # the last line torn by a kill
    runs.trim_log(str(log), start_epoch=2)
    assert log.read_text() == '{"epoch": 0}\n{"epoch": 1}\n'


def test_resume_auto_finds_the_latest_checkpoint_or_nothing(tmp_path):
    args = argparse.Namespace(resume="auto", output_dir=str(tmp_path))
    assert runs.resolve_resume(args, "latest.pth") is None
    (tmp_path / "latest.pth").write_bytes(b"")
    assert runs.resolve_resume(args, "latest.pth") == str(tmp_path / "latest.pth")
    assert runs.resolve_resume(argparse.Namespace(resume="x.pth", output_dir=""), "latest.pth") == "x.pth"


def test_loading_refuses_code_and_names_broken_files(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="unpickling it could run code"):
        checkpoints.safe_torch_load(str(tmp_path / "evil.pth"))
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt, truncated or not a PyTorch file"):
        checkpoints.safe_torch_load(str(tmp_path / "broken.pth"))
    with pytest.raises(CheckpointError, match="not found"):
        checkpoints.safe_torch_load(str(tmp_path / "missing.pth"))


def test_strict_loading_names_the_keys_adds_the_hint_and_may_leave_keys_fresh():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4))
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("1.")}
    with pytest.raises(CheckpointError, match=r"missing from file: 1.weight \[4, 3\], 1.bias \[4\]; try this"):
        checkpoints.strict_load(model, state, "file.pth", hint=lambda model, state: "try this")
    assert checkpoints.strict_load(model, state, "file.pth", may_start_fresh=lambda key: key.startswith("1.")) == [
        "1.weight", "1.bias"]
    wrong = dict(model.state_dict(), **{"0.weight": torch.zeros(5, 2)})
    with pytest.raises(CheckpointError, match=r"shape mismatch: 0.weight file \[5, 2\] vs model \[3, 2\]"):
        checkpoints.strict_load(model, wrong)


def test_ddp_prefixes_round_trip():
    state = {"head.weight": torch.ones(1)}
    assert checkpoints.strip_ddp_prefix(checkpoints.add_ddp_prefix(state)) == state
    assert list(checkpoints.add_ddp_prefix(state)) == ["module.head.weight"]


def test_atomic_saving_and_room_for_checkpoints(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    checkpoints.save_atomically({"step": torch.tensor(3)}, str(path))
    assert checkpoints.safe_torch_load(str(path))["step"].item() == 3 and os.listdir(tmp_path) == ["latest.pth"]
    assert checkpoints.tensor_bytes({"a": torch.zeros(4), "state": {0: {"exp_avg": torch.zeros(2, 2)}}}) == 32
    monkeypatch.setattr(checkpoints, "_free_bytes", lambda folder: 3 * 2 ** 20)
    checkpoints.require_room_for_checkpoints(str(tmp_path), 2 ** 20)
    with pytest.raises(BadInput, match="3 MiB free, and the run needs 4 MiB for 2 checkpoints of 2 MiB"):
        checkpoints.require_room_for_checkpoints(str(tmp_path), 2 * 2 ** 20)


def test_only_the_temporaries_of_writers_that_are_gone_are_cleared(tmp_path):
    path, host = tmp_path / "latest.pth", checkpoints._HOST
    live = tmp_path / f".latest.pth.tmp.{host}.{os.getpid()}.0000live"  # this process: still writing
    dead = tmp_path / f".latest.pth.tmp.{host}.999999999.0000dead"  # a writer killed here
    elsewhere = tmp_path / ".latest.pth.tmp.other-host.12.0000busy"  # another machine, still growing
    abandoned = tmp_path / ".latest.pth.tmp.other-host.34.00000old"  # another machine, untouched for an hour
    for temporary in (live, dead, elsewhere, abandoned):
        temporary.write_bytes(b"half a checkpoint")
    an_hour_ago = time.time() - 3600
    os.utime(abandoned, (an_hour_ago, an_hour_ago))
    checkpoints.save_atomically({"step": 1}, str(path))
    assert sorted(os.listdir(tmp_path)) == sorted(["latest.pth", live.name, elsewhere.name])
