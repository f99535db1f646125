"""Every command of the documentation and of scripts/ that runs an entry point parses as written, and passes the
checks its entry point makes before any work: the paper's spellings stay accepted. The scripts run under bash
with the interpreter replaced by a recorder, so their variables and arrays expand as they would for a person;
the documentation's fenced shell blocks are read as written (``...`` stands for more flags)."""
import contextlib
import glob
import io
import json
import os
import shlex
import stat
import subprocess
import sys

import pytest
from conftest import REPO

import config
from generation.arguments import checked_arguments, parse_arguments
from vidt.arguments import check_supported
from vidt.arguments import parse_arguments as detection_arguments
from vkd.cli import ENTRY_POINTS

DOCUMENTS = ["README.md", "vidt/README.md", "generation/README.md", *sorted(glob.glob("docs/**/*.md", root_dir=REPO,
                                                                                        recursive=True))]
SCRIPTS = sorted(glob.glob("scripts/*.sh", root_dir=REPO))
# What the scripts read from the environment; every optional flag is given, to parse it too.
SCRIPT_ENVIRONMENT = {"DATA": "/data/imagenet", "CKPT": "/ckpts/latest.pth.tar", "NGPU": "2", "OUT": "out",
                      "STUDENT": "deit_s_distilled", "TEACHER_PATH": "regnety_160-a5fe301d.pth", "COCO": "/coco",
                      "TEACHER": "/ckpts/vidt_base_150.pth", "COLUMN": "c10_10pct", "DATASET": "C100",
                      "INCEPTION": "inception.pth", "CLIP": "clip.bin", "MASTER_PORT": "29600", "N": "1"}
PARSERS = {"classification": config.parse_arguments, "detection": detection_arguments, "generation": parse_arguments}
SCRIPT_CONFIGS = {"scripts/gen_train.sh": "configs/generation/c100_20pct_vkd_layernorm.yaml"}


def checked(tree: str, flags, cwd: str) -> None:
    """``flags`` parsed and checked as ``tree``'s entry point does before any work, from ``cwd`` (``--help``: it
    prints the flags and exits with code 0)."""
    here = os.getcwd()
    os.chdir(cwd)
    try:
        if "--help" in flags:
            with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as shown:
                PARSERS[tree](flags)
            assert shown.value.code == 0
        elif tree == "classification":
            config.check_arguments(*config.parse_arguments(flags))
        elif tree == "detection":
            check_supported(*detection_arguments(flags))
        else:
            checked_arguments(flags)
    finally:
        os.chdir(here)


def entry_point_flags(tokens, cwd: str):
    """(tree, the flags after the entry point) of a command line, or None when it runs no entry point."""
    for index, token in enumerate(tokens):
        if token == "-m" and index + 1 < len(tokens):
            module = tokens[index + 1]
            tree = next((tree for tree, (program, _) in ENTRY_POINTS.items() if program == ("-m", module)), None)
            if tree:
                return tree, tokens[index + 2:]
        if token == "main_distributed.py":
            return "classification", tokens[index + 1:]
        if token == "main.py" and os.path.basename(cwd) == "vidt":
            return "detection", tokens[index + 1:]
    return None


def recorder(folder) -> str:
    """An executable standing in for the interpreter: it writes where it ran and its arguments, one JSON line."""
    path = os.path.join(folder, "python")
    with open(path, "w") as handle:
        handle.write(f"#!{sys.executable}\nimport json, os, sys\n"
                     "with open(os.environ['COMMAND_RECORD'], 'a') as record:\n"
                     "    record.write(json.dumps({'cwd': os.getcwd(), 'argv': sys.argv[1:]}) + '\\n')\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


@pytest.fixture(scope="module")
def script_commands(tmp_path_factory):
    """(script, tree, cwd, flags) of every entry point run by a script of scripts/."""
    folder = tmp_path_factory.mktemp("recorder")
    srun = folder / "srun"  # Slurm's launcher: runs the task here
    srun.write_text('#!/bin/sh\nexec "$@"\n')
    srun.chmod(0o755)
    found = []
    for script in SCRIPTS:
        record = folder / (os.path.basename(script) + ".jsonl")
        record.write_text("")
        env = dict(os.environ, **SCRIPT_ENVIRONMENT, PYTHON=recorder(folder), COMMAND_RECORD=str(record),
                   PATH=f"{folder}{os.pathsep}{os.environ['PATH']}", DEMO_DIR=str(folder / "demo"),
                   STRESS_DIR=str(folder / "stress"))
        if script in SCRIPT_CONFIGS:
            env["CONFIG"] = SCRIPT_CONFIGS[script]
        result = subprocess.run(["bash", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (script, result.stderr[-2000:])
        for line in record.read_text().splitlines():
            call = json.loads(line)
            command = entry_point_flags(call["argv"], call["cwd"])
            if command:
                found.append((script, command[0], call["cwd"], command[1]))
    return found


def documented_commands():
    """(document, tree, flags) of every entry point run in a fenced shell block of the documentation."""
    found = []
    for document in DOCUMENTS:
        with open(os.path.join(REPO, document)) as handle:
            text = handle.read()
        blocks = text.split("```")[1::2]  # the fenced blocks, each starting with its language
        for block in blocks:
            language, _, body = block.partition("\n")
            if language.strip() not in ("bash", "sh", "shell", ""):
                continue
            for line in body.replace("\\\n", " ").splitlines():
                tokens = [token for token in shlex.split(line, comments=True) if token != "..."]
                cwd = os.path.join(REPO, "vidt") if document.startswith("vidt/") else REPO
                command = entry_point_flags(tokens, cwd)
                if command:
                    found.append((document, command[0], command[1], cwd))
    return found


def test_every_script_s_entry_point_command_parses_and_passes_its_checks(script_commands):
    trees = {tree for _, tree, _, _ in script_commands}
    assert trees == set(ENTRY_POINTS) and len(script_commands) >= 15, script_commands
    for script, tree, cwd, flags in script_commands:
        try:
            checked(tree, flags, cwd)
        except Exception as error:
            pytest.fail(f"{script}: {tree} {' '.join(flags)}: {error}")


def test_every_documented_command_parses_and_passes_its_checks():
    commands = documented_commands()
    assert {tree for _, tree, _, _ in commands} >= {"classification", "generation"} and len(commands) >= 8
    for document, tree, flags, cwd in commands:
        try:
            checked(tree, flags, cwd)
        except Exception as error:
            pytest.fail(f"{document}: {tree} {' '.join(flags)}: {error}")


@pytest.mark.parametrize("tree", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("spelling", ["--output_dir", "--output-dir"])
def test_every_tree_takes_both_spellings_of_the_output_folder(tree, spelling):
    parsed = PARSERS[tree]([spelling, "runs/x"])
    assert (parsed if tree == "generation" else parsed[0]).output_dir == "runs/x"
    assert ENTRY_POINTS[tree].output_flag in ("--output_dir", "--output-dir")


@pytest.mark.parametrize("subset, fraction", [("FULL", 1.0), ("1PERCENT", 0.01), ("10PERCENT", 0.1),
                                              ("20PERCENT", 0.2)])
def test_generation_takes_classification_s_subset_names_for_its_data_fraction(subset, fraction):
    args = parse_arguments(["--subset", subset])
    assert args.data_fraction == fraction and "subset" not in vars(args)
    assert parse_arguments(["--data-fraction", "0.5", "--subset", subset]).data_fraction == fraction  # the last wins


def test_every_benchmark_imports_as_a_module_from_the_repository_root():
    """The benchmarks run as ``python -m benchmarks.NAME`` from the root, without PYTHONPATH: each imports there
    (a sibling imported by its bare name, as when they ran as scripts, would not)."""
    names = sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(REPO, "benchmarks", "*.py"))
                   if not path.endswith("__init__.py"))
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    script = "import importlib, sys\nfor name in sys.argv[1:]: importlib.import_module('benchmarks.' + name)"
    result = subprocess.run([sys.executable, "-c", script, *names], cwd=REPO, env=environment, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"ablation_cache", "projector_ratio", "speedups", "train_step"} <= set(names)
