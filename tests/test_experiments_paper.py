"""experiments.paper: the published numbers are the ones the recorded reports print, and the tables mark
what the paper marks."""
import os

from experiments import paper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recorded(experiment: str) -> str:
    with open(os.path.join(REPO, "results", experiment, "README.md")) as handle:
        return handle.read()


def test_the_recorded_reports_print_these_numbers():
    ablation = recorded("ablation")
    for table in (paper.imagenet_table(), paper.coco_table()):
        assert "\n".join(table) in ablation
    assert paper.generation_sentence() in ablation
    assert "\n".join(paper.generation_table()) in recorded("generation")


def test_tables_hold_every_number():
    imagenet, coco = "\n".join(paper.imagenet_table()), "\n".join(paper.coco_table())
    for row in paper.IMAGENET.values():
        assert f"{row['paper'][0]:.1f} / {row['paper'][1]:.1f}" in imagenet and row["params"] in imagenet
    for row in paper.COCO.values():
        assert " | ".join(f"{row[metric]:.1f}" for metric in paper.COCO_METRICS) in coco
    assert all(len(line.split("|")) == len(paper.coco_table()[0].split("|")) for line in paper.coco_table())


def test_the_best_fid_of_each_column_is_bold():
    lines = paper.generation_table()[2:]
    bold = [[cell.strip() for cell in line.split("|")[2:4]] for line in lines]
    assert [row for row in bold if any(cell.startswith("**") for cell in row)] == [["**13.16**", "**16.87**"]]
    assert min(fids[0] for fids in paper.GENERATION_FID_10_PERCENT.values()) == 13.16
