"""The documentation: README.md is an index of at most 250 lines, every relative link of the documentation
resolves (files and headings), its table of distillation methods is the registry's, and the numbers it quotes
are the ones the results' JSON files hold."""
import glob
import json
import os
import re

import pytest

import distillers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "ARCHITECTURE.md", "vidt/README.md", "generation/README.md", "benchmarks/RESULTS.md",
         *sorted(os.path.relpath(path, REPO) for path in glob.glob(os.path.join(REPO, "docs", "*.md"))),
         *sorted(os.path.relpath(path, REPO) for path in glob.glob(os.path.join(REPO, "results", "*", "README.md")))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
MAX_README_LINES = 250


def read(relative: str) -> str:
    with open(os.path.join(REPO, relative)) as handle:
        return handle.read()


def heading_anchors(markdown: str) -> set:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#") and not line.startswith("#!"):
            text = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def outside_code(markdown: str) -> str:
    return re.sub(r"```.*?```", "", markdown, flags=re.S)


def test_readme_is_an_index():
    assert len(read("README.md").splitlines()) <= MAX_README_LINES
    for page in ("training", "cluster", "differences", "export", "own-loop", "performance", "studies"):
        assert f"(docs/{page}.md)" in read("README.md"), page


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(outside_code(read(page))):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(REPO, resolved)):
            broken.append(f"{target}: no {resolved}")
        elif anchor and resolved.endswith(".md") and anchor not in heading_anchors(read(resolved)):
            broken.append(f"{target}: no heading '{anchor}' in {resolved}")
    assert not broken, f"{page}: " + "; ".join(broken)


def test_the_readme_lists_every_distiller_with_its_flags():
    rows = {}
    for line in read("README.md").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`([\w-]+)`", cells[0]) if len(cells) == 4 else None
        if name and not name.group(1).startswith("-"):  # | `name` | what it computes | its flags | source |
            rows[name.group(1)] = set(re.findall(r"`(--[\w-]+)`", cells[2]))
    assert set(rows) == set(distillers.DISTILLERS)
    for name, cls in distillers.DISTILLERS.items():
        assert rows[name] == {flag.name for flag in cls.flags}, name


def results(study: str, name: str) -> dict:
    with open(os.path.join(REPO, "results", study, name)) as handle:
        return json.load(handle)


def row_text(rows: list, name: str, digits: int = 2) -> str:
    row = next(row for row in rows if row["row"] == name)
    return f"{row['acc1_mean']:.{digits}f} ± {row['acc1_std']:.{digits}f}"


def test_the_readme_quotes_the_measured_numbers_of_the_results():
    readme = read("README.md")
    fmnist = results("fmnist", "fmnist.json")["rows"]
    assert (f"VkD {row_text(fmnist, 'row3_vkd')}; no distillation {row_text(fmnist, 'row1_no_distillation')}"
            in readme)
    assert (f"VkD {row_text(fmnist, 'row13_cnn_vkd')}; no distillation {row_text(fmnist, 'row10_cnn_none')}"
            in readme)
    ablation = results("ablation", "ablation.json")["rows"]
    assert f"VkD {row_text(ablation, 'row5_vkd')}; no distillation {row_text(ablation, 'row1_no_distillation')}" in readme
    generation = read("results/generation/README.md")
    for row in ("DiffAugment only", "VkD, whitened teacher"):
        final = re.search(rf"^\| {row} \| ([\d.]+ ± [\d.]+) \|", generation, re.M).group(1)
        assert final in readme, row


# The paper's DeiT-Ti (Table 1) and its RegNetY-160 teacher's top-1 on ImageNet, cited, not measured.
PAPER_DEIT_TI_VKD, PAPER_REGNETY_160 = 78.3, 82.6


def test_the_readme_says_what_distilling_bought_from_the_measured_figures():
    """Each pair's line of README's table: benchmarks/RESULTS.md's ratios, and the student's accuracy as a share
    of its teacher's (the paper's at 224 px; VkD's rows of the Fashion-MNIST study at 32 px)."""
    benchmark = next(line for line in read("benchmarks/RESULTS.md").splitlines() if line.startswith('{"pairs"'))
    pairs = json.loads(benchmark)["pairs"]
    study = results("fmnist", "fmnist.json")
    mean = {row["row"]: row["acc1_mean"] for row in study["rows"]}
    shares = {"imagenet": PAPER_DEIT_TI_VKD / PAPER_REGNETY_160,
              "fmnist": mean["row3_vkd"] / study["teacher_acc1"],
              "fmnist-cnn": mean["row13_cnn_vkd"] / study["teacher_acc1"]}
    lines = read("README.md").splitlines()
    for pair, share in shares.items():
        ratio = pairs[pair]["teacher_over_student"]
        cells = (f"| {ratio['parameters']:.2f}× / {ratio['flops']:.2f}× | "
                 f"{ratio['eager_latency']:.2f}× / {ratio['eager_throughput']:.2f}× | "
                 f"{ratio['onnxruntime_latency']:.2f}× / {ratio['onnxruntime_throughput']:.2f}× | {100 * share:.1f}% ")
        assert any(cells in line for line in lines), (pair, cells)


def test_the_studies_page_quotes_the_recorded_comparisons():
    """docs/studies.md gives every paired comparison of the Fashion-MNIST study that has an interval as
    fmnist.json holds it."""
    studies = " ".join(read("docs/studies.md").split())
    for comparison in results("fmnist", "fmnist.json")["comparisons"]:
        if comparison["ci95"] is not None:
            low, high = comparison["ci95"]
            quoted = f"{comparison['mean']:+.2f} ({low:+.2f} to {high:+.2f})"
            assert quoted in studies, (comparison["first"], comparison["second"], quoted)
