"""Run folders at their edges: a resume goes on in the folder of the run it resumes or into an empty one, never
over another run; every unreadable args.json is kept."""
import argparse
import json
import os

import pytest

import generation.main
from vkd import runs
from vkd.errors import BadInput


def folder_holding_a_run(folder):
    folder.mkdir(parents=True)
    (folder / "latest.pth.tar").write_bytes(b"the weights of run B")
    (folder / "args.json").write_text('{"args": {"seed": 1}}\n')
    return {name: (folder / name).read_bytes() for name in os.listdir(folder)}


def test_a_resume_continues_in_its_own_folder_or_an_empty_one(tmp_path):
    own, other, empty = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    folder_holding_a_run(own)
    folder_holding_a_run(other)
    checkpoint = str(own / "latest.pth.tar")
    for resume in ("auto", checkpoint, os.path.relpath(checkpoint)):
        assert runs.prepare_output_dir(str(own), resume, overwrite=False, is_main=True) is None
    assert runs.prepare_output_dir(str(empty), checkpoint, overwrite=False, is_main=True) is None
    with pytest.raises(BadInput, match=rf"{other} already holds a run \(args.json, latest.pth.tar\), not the run of "
                                       rf"{checkpoint}: a resume goes on in the folder of the run it resumes"):
        runs.prepare_output_dir(str(other), checkpoint, overwrite=False, is_main=True)
    aside = runs.prepare_output_dir(str(other), checkpoint, overwrite=True, is_main=True)
    assert os.path.basename(aside).startswith("b.previous-") and not other.exists()


def assert_refused_writing_nothing(code, err, other, resumed, before):
    assert code == 2 and err.count("\n") == 1, err
    assert f"error: output folder {other} already holds a run" in err and f"not the run of {resumed}" in err
    assert {name: (other / name).read_bytes() for name in os.listdir(other)} == before


def test_resuming_another_run_into_a_folder_holding_a_run_is_refused_and_writes_nothing(run_main, train_flags,
                                                                                         tmp_path):
    code, _, err = run_main(train_flags + ["--epochs", 1, "--output_dir", tmp_path / "a"])
    assert code == 0, err[-2000:]
    other, resumed = tmp_path / "b", tmp_path / "a" / "latest.pth.tar"
    before = folder_holding_a_run(other)
    code, _, err = run_main(train_flags + ["--epochs", 2, "--resume", resumed, "--output_dir", other])
    assert_refused_writing_nothing(code, err, other, resumed, before)
    code, _, err = run_main(train_flags + ["--epochs", 2, "--resume", resumed, "--output_dir", tmp_path / "c"])
    assert code == 0, err[-2000:]


def test_generation_refuses_resuming_into_a_folder_holding_another_run(run_entry_point, tmp_path):
    other, resumed = tmp_path / "b", tmp_path / "a" / "latest.pth"
    before = folder_holding_a_run(other)
    code, _, err = run_entry_point(generation.main, ["--resume", resumed, "--output-dir", other,
                                                     "--fid-extractor", "none", "--device", "cpu"])
    assert_refused_writing_nothing(code, err, other, resumed, before)


def test_each_unreadable_args_json_is_kept_and_named(tmp_path):
    args = argparse.Namespace(output_dir=str(tmp_path), lr=1e-3)
    path = tmp_path / runs.ARGS_FILE
    for number, kept in enumerate(("args.json.unreadable", "args.json.unreadable.1", "args.json.unreadable.2")):
        path.write_text(f"{{torn {number}")
        with pytest.warns(UserWarning, match=rf"{path} could not be read: kept as {tmp_path / kept}"):
            runs.record_invocation(args, ["--lr", "1e-3"], world_size=1)
        assert json.loads(path.read_text())["args"]["lr"] == 1e-3
    assert [(tmp_path / kept).read_text() for kept in ("args.json.unreadable", "args.json.unreadable.1",
                                                       "args.json.unreadable.2")] == ["{torn 0", "{torn 1", "{torn 2"]
