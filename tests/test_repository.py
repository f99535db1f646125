"""The repository stands alone: no tracked file points to material a reader of the repository does not have."""
import os
import re
import subprocess

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Private design notes, the folder they lived in, the project's tracker, and paths of the machines the
# project was built on. Say the fact itself, or cite the paper and the original repositories by name.
FORBIDDEN = {
    "a private design note": re.compile(r"\b(?:VIDT_|GEN_)?SPEC(?:\.md)?\b"),
    "the private notes folder": re.compile(r"(?<![\w.])\.{0,2}/?shared/"),
    "'the seed' (say 'the paper's commands')": re.compile(r"\b(?:the|a) seed(?:'s)? (?:command|recipe|repo|code)",
                                                          re.IGNORECASE),
    "an issue number of this project's tracker": re.compile(r"\bissues? #?\d+\b(?! of)", re.IGNORECASE),
    "a path of the machine that wrote the file": re.compile(r"(?<![\w.])/(?:work|root|home/\w+|tmp/bash_jobs)/"),
    "wording about one build machine": re.compile(r"\bthis machine\b|\bno GPU has been lent\b", re.IGNORECASE),
}
# This file names the patterns themselves.
EXEMPT = {"tests/test_repository.py"}


def tracked_files():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    return [name for name in listed.decode().split("\0") if name and name not in EXEMPT]


def forbidden_mentions(text: str):
    return [what for what, pattern in FORBIDDEN.items() if pattern.search(text)]


def test_no_tracked_file_refers_to_material_outside_the_repository():
    if not os.path.exists(os.path.join(REPO_ROOT, ".git")):  # a folder, or a file in a git worktree
        pytest.skip("not a git checkout")
    offenders = []
    for name in tracked_files():
        path = os.path.join(REPO_ROOT, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as handle:
            content = handle.read()
        if b"\0" in content[:4096]:  # binary (PNG, ...)
            continue
        text = content.decode("utf-8", errors="replace")
        for line_number, line in enumerate(text.splitlines(), 1):
            for what in forbidden_mentions(line):
                offenders.append(f"{name}:{line_number}: {what}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders[:40]) + (f"\n(+{len(offenders) - 40} more)" if len(offenders) > 40 else "")


# The examples are assembled from pieces, so that this file itself names none of what it forbids.
NOTE, FOLDER, SEED, ISSUE, MACHINE = "SP" + "EC", "sha" + "red", "se" + "ed", "iss" + "ue", "this mach" + "ine"


@pytest.mark.parametrize("line", [
    f"defaults as {NOTE}.md section 2 says", f"see VIDT_{NOTE} section 5", f"read ../{FOLDER}/VIDT_{NOTE}.md",
    f"the {SEED}'s commands run as written", f"fixed in {ISSUE} 12", f"as {ISSUE} #4 asked",
    "python /wo" + "rk/main/experiments/demo.py", f"measured on {MACHINE}", "No GPU has been le" + "nt to this project",
])
def test_each_forbidden_kind_is_caught(line):
    assert forbidden_mentions(line)


@pytest.mark.parametrize("line", [
    "seed + rank for each process", "--seed 0", "the paper's commands", "results/ablation/README.md",
    "shared by real and fake", "a 2-core Intel Xeon, 2026-11-30", "one of the issues of the original repository",
])
def test_ordinary_wording_passes(line):
    assert not forbidden_mentions(line)
