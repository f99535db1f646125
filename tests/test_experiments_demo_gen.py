"""The offline GAN demo: its jobs are the recorded runs' commands, and its results page is written from
summary.json (no training)."""
import json
import os
import re

from experiments import demo_gen, paper
from experiments.runner import write_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDED_PAGE = os.path.join(REPO, demo_gen.RESULTS, "README.md")


def recorded_commands() -> dict:
    """Each run's and network's command as results/generation/README.md lists it, without the interpreter."""
    with open(RECORDED_PAGE) as handle:
        page = handle.read()
    runs = dict(re.findall(r"^- `([a-z]+/seed\d)`: `python (.+)`$", page, re.MULTILINE))
    networks = dict(re.findall(r"^- ([a-z_]+): `python (.+)`$", page, re.MULTILINE))
    return {**runs, **networks}


def test_the_jobs_are_the_recorded_runs():
    recorded = recorded_commands()
    jobs = demo_gen.network_jobs(threads=1) + [demo_gen.gan_job(row, seed, threads=1)
                                                for row in demo_gen.ROWS for seed in (0, 1, 2)]
    assert sorted(job.name for job in jobs) == sorted(recorded)
    for job in jobs:
        assert " ".join(job.command()[1:]) == recorded[job.name], job.name
    whiten = demo_gen.gan_job("whiten", 0, threads=1)
    assert whiten.resumable and whiten.entry_point == "generation" and whiten.threads == 1


def fake_summary(rows=("baseline", "whiten"), seeds=(0, 1)):
    runs = {}
    for index, (row, seed) in enumerate((row, seed) for row in rows for seed in seeds):
        job = demo_gen.gan_job(row, seed, threads=1)
        runs[job.name] = {"row": row, "seed": seed, "fid": 30.0 + index, "best_fid": 29.0 + index,
                          "best_iteration": 200, "is": 1.5, "seconds": 60.0, "iterations": 300, "command": job.shell_command(),
                          "output_dir": job.output_dir}
    networks = {job.name: {"model": demo_gen.NETWORK_MODELS[job.name], "val_acc1": 90.0, "seconds": 5.0,
                           "command": job.shell_command()} for job in demo_gen.network_jobs(threads=1)}
    return {"note": demo_gen.NOT_COMPARABLE, "seconds": 100.0, "config": demo_gen.CONFIG,
            "command": "python -m experiments.demo_gen --seeds 0 1 --write-results", "torch": "2", "cores": 2,
            "networks": networks, "seeds": list(seeds), "runs": runs,
            "rows": {row: {"title": demo_gen.ROWS[row][0]} for row in rows}}


def test_the_printed_table_and_the_comparison_give_the_runs_numbers():
    summary = fake_summary()  # baseline FIDs 30, 31; whiten 32, 33
    table = demo_gen.table(summary)
    assert table[1].split()[2:5] == ["30.500", "±", "0.707"] and table[2].split()[3:6] == ["32.500", "±", "0.707"]
    assert demo_gen.comparison(summary)[2] == "- VkD, whitened teacher: +2.000 (+2.83 of the larger std, 0.707)"
    assert demo_gen.comparison(fake_summary(seeds=(0,))) == []  # one seed has no spread
    assert demo_gen.mean_std([1.0]) == "1.000" and demo_gen.mean_std([1.0, 3.0]) == "2.000 ± 1.414"


def test_write_report_writes_the_summary_and_its_page(tmp_path):
    summary = fake_summary()
    write_report(str(tmp_path), "summary.json", summary, demo_gen.results_page)
    with open(tmp_path / "summary.json") as handle:
        assert json.load(handle) == summary
    page = (tmp_path / "README.md").read_text()
    assert page == demo_gen.results_page(summary)
    for run in summary["runs"].values():
        assert f"`{run['command']}`" in page
    assert "\n".join(paper.generation_table()) in page

