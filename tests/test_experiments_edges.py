"""The experiments drivers at their edges: --help and a bad flag before any work, one line each; --jobs checked;
a results folder that cannot be written refused before the runs, not after them."""
import errno
import os
import tempfile

import pytest

import experiments.ablation
import experiments.demo
import experiments.demo_gen
import experiments.fmnist

DRIVERS = {"demo": experiments.demo, "ablation": experiments.ablation, "fmnist": experiments.fmnist,
           "demo_gen": experiments.demo_gen}


class Started(Exception):
    """What a driver that got as far as its work raises here instead."""


@pytest.fixture
def nothing_starts(monkeypatch):
    """The drivers' work (exporting data, running jobs) raises ``Started``; the working folder is restored."""
    def started(*args, **kwargs):
        raise Started

    monkeypatch.chdir(os.getcwd())
    for module in DRIVERS.values():
        monkeypatch.setattr(module, "run_jobs", started)
        monkeypatch.setattr(module.datasets, "export_digits", started, raising=False)


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_help_prints_the_driver_s_description_and_starts_nothing(name, nothing_starts, capsys):
    with pytest.raises(SystemExit) as exit_:
        DRIVERS[name].main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: ") and DRIVERS[name].__doc__.splitlines()[0] in out


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_a_bad_flag_is_one_line_without_the_usage(name, nothing_starts, run_entry_point):
    code, out, err = run_entry_point(DRIVERS[name], ["--no-such-flag"])
    assert (code, out, err) == (2, "", "error: unrecognized arguments: --no-such-flag (--help lists every flag)\n")


@pytest.mark.parametrize("jobs", ["0", "-1"])
def test_demo_gen_needs_at_least_one_job(jobs, nothing_starts, run_entry_point):
    assert run_entry_point(experiments.demo_gen, ["--jobs", jobs]) == (2, "", f"error: --jobs must be at least 1, "
                                                                              f"got {jobs}\n")


@pytest.mark.parametrize("name, argv", [("demo", []), ("ablation", []), ("fmnist", []),
                                        ("demo_gen", ["--write-results"])])
def test_a_results_folder_that_cannot_be_written_is_one_line_before_the_runs(name, argv, nothing_starts,
                                                                             run_entry_point, monkeypatch, tmp_path):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    results = tmp_path / "results"
    monkeypatch.setattr(DRIVERS[name], "RESULTS", str(results))
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    code, _, err = run_entry_point(DRIVERS[name], argv)
    assert (code, err) == (2, f"error: results folder {results} cannot be written (Read-only file system): choose "
                              "another folder\n")
