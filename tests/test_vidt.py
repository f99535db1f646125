"""CPU tests of the ViDT + VkD detection tree (vidt/).

Unit tests assert numbers on tiny inputs; the key-manifest tests build the real default models; the
end-to-end tests run vidt/main.py on a synthetic COCO set (images of 128x160 px).
"""
import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vidt.main
from vidt.arguments import check_supported, get_args_parser, parse_arguments
from vidt.datasets.transforms import make_coco_transforms, resized_shape
from vidt.engine import train_one_epoch
from vidt.models.build import build_detector, build_teacher, build_weight_dict, load_student_weights
from vidt.models.criterion import SetCriterion, distillation_loss
from vidt.models.detector import PostProcess, is_projector_key
from vidt.models.matcher import HungarianMatcher
from vidt.models.ms_deform_attn import MSDeformAttn, multi_scale_deformable_attention
from vidt.optim import build_scheduler, param_groups, step_scheduler
from vidt.tools.make_synthetic_coco import make_synthetic_coco
from vidt.util.nested_tensor import nested_tensor_from_images
from vidt.util.printing import setup_for_distributed_printing
from vkd.distributed import launcher_ranks
from vkd.errors import BadInput, CheckpointError

REPO_ROOT = Path(__file__).resolve().parents[1]
VIDT_DIR = REPO_ROOT / "vidt"
REFERENCE_DIR = REPO_ROOT / "reference"
COCO_SUMMARY_LINE = "Average Precision  (AP) @[ IoU=0.50:0.95"
PAPER_FLAGS = ["--method", "vidt", "--aux_loss", "True", "--with_box_refine", "True", "--pre_trained", "none"]
SMALL_IMAGE_FLAGS = ["--train_sizes", "96", "112", "128", "--max_size", "213", "--eval_size", "128",
                     "--num_workers", "0", "--device", "cpu", "--print_freq", "1"]


def parse_args(*extra):
    return get_args_parser().parse_args(PAPER_FLAGS + list(extra))


def read_manifest(name):
    return [tuple(line.split("\t")) for line in (REFERENCE_DIR / f"{name}_keys.tsv").read_text().splitlines()]


def state_manifest(state):
    return [(k, str(list(v.shape))) for k, v in state.items()]


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return build_detector(parse_args(), "swin_nano", "none", distil=True, with_projectors=True)


# ---------------------------------------------------------------------------------------------
# Matcher and criterion
# ---------------------------------------------------------------------------------------------

def random_targets(generator, counts, num_classes=5):
    targets = []
    for n in counts:
        centres = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=generator) * 0.2 + 0.05
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=generator),
                        "boxes": torch.cat([centres, sizes], dim=1)})
    return targets


def random_outputs(generator, batch, queries, num_classes=5):
    boxes = torch.cat([torch.rand(batch, queries, 2, generator=generator),
                       torch.rand(batch, queries, 2, generator=generator) * 0.3 + 0.02], dim=-1)
    return {"pred_logits": torch.randn(batch, queries, num_classes, generator=generator), "pred_boxes": boxes}


def test_matcher_batched_equals_one_image_at_a_time():
    generator = torch.Generator().manual_seed(0)
    outputs = random_outputs(generator, batch=3, queries=7)
    targets = random_targets(generator, counts=[3, 0, 5])
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for image, (rows, cols) in enumerate(batched):
        single = matcher({k: v[image:image + 1] for k, v in outputs.items()}, [targets[image]])[0]
        assert torch.equal(rows, single[0]) and torch.equal(cols, single[1])
        assert len(rows) == len(targets[image]["labels"])
    assert len(batched[1][0]) == 0


def test_matcher_with_only_empty_targets():
    generator = torch.Generator().manual_seed(1)
    indices = HungarianMatcher()(random_outputs(generator, 2, 4), random_targets(generator, [0, 0]))
    assert [(len(r), len(c)) for r, c in indices] == [(0, 0), (0, 0)]


def test_matcher_picks_the_overlapping_query():
    outputs = {"pred_logits": torch.zeros(1, 3, 2),
               "pred_boxes": torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3]]])}
    targets = [{"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.69, 0.7, 0.2, 0.2], [0.2, 0.21, 0.1, 0.1]])}]
    rows, cols = HungarianMatcher()(outputs, targets)[0]
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 1, 1: 0}


def test_criterion_on_known_inputs():
    """All logits 0 (p = 0.5): focal terms are log2 * 0.25 * (0.25 per positive, 0.75 per negative);
    matched boxes off by 0.1 in cx give L1 = 0.1 per box and a known GIoU."""
    num_classes, queries = 4, 3
    target_boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.4]])
    pred_boxes = torch.tensor([[[0.4, 0.3, 0.2, 0.2], [0.5, 0.9, 0.05, 0.05], [0.8, 0.6, 0.2, 0.4]]])
    outputs = {"pred_logits": torch.zeros(1, queries, num_classes), "pred_boxes": pred_boxes}
    targets = [{"labels": torch.tensor([2, 3]), "boxes": target_boxes}]
    criterion = SetCriterion(HungarianMatcher(), {"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2}, 0.25)
    losses = criterion(outputs, targets)

    positives, negatives = 2, queries * num_classes - 2
    expected_ce = math.log(2) * 0.25 * (0.25 * positives + 0.75 * negatives) / 2
    # Each matched pair: two 0.2x0.2 (or 0.2x0.4) boxes shifted by half their width: IoU 1/3, hull = union.
    expected_giou = 1 - 1 / 3
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(expected_giou, rel=1e-5)
    assert losses["class_error"].item() == pytest.approx(100.0)


def test_aux_losses_and_weight_dict_follow_the_paper_flags():
    args = parse_args("--distil_model", "vidt_base", "--distil_model_path", "unused")
    weights = build_weight_dict(args)
    assert weights["loss_distil"] == 4.0 and weights["loss_ce_5"] == 2 and weights["loss_bbox_0"] == 5
    assert len(weights) == 3 * 7 + 1
    generator = torch.Generator().manual_seed(2)
    outputs = random_outputs(generator, 2, 5, num_classes=91)
    outputs["aux_outputs"] = [random_outputs(generator, 2, 5, num_classes=91) for _ in range(6)]
    losses = SetCriterion(HungarianMatcher(), weights, 0.25)(outputs, random_targets(generator, [2, 1]))
    assert {f"loss_giou_{i}" for i in range(6)} <= set(losses)


def test_distillation_loss_is_invariant_to_per_feature_affine_maps():
    generator = torch.Generator().manual_seed(3)
    teacher = {"patch_token": [torch.randn(50, 8, generator=generator) for _ in range(4)],
               "body_det_token": torch.randn(20, 8, generator=generator),
               "neck_det_token": torch.randn(70, 8, generator=generator)}
    scale, shift = torch.rand(8, generator=generator) + 0.5, torch.randn(8, generator=generator)
    affine = {"patch_token": [t * scale + shift for t in teacher["patch_token"]],
              "body_det_token": teacher["body_det_token"] * scale + shift,
              "neck_det_token": teacher["neck_det_token"] * scale + shift}
    assert distillation_loss(affine, teacher).item() == pytest.approx(0.0, abs=1e-5)
    noisy = dict(affine, body_det_token=torch.randn(20, 8, generator=generator))
    assert distillation_loss(noisy, teacher).item() > 0.1


def test_postprocess_top100_over_queries_and_classes():
    logits = torch.full((1, 200, 91), -10.0)
    logits[0, 7, 3] = 5.0
    boxes = torch.tensor([0.5, 0.5, 0.2, 0.4]).repeat(1, 200, 1)
    result = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))[0]
    assert result["scores"].shape == (100,)
    assert result["labels"][0].item() == 3
    assert result["boxes"][0].tolist() == pytest.approx([80.0, 30.0, 120.0, 70.0])


# ---------------------------------------------------------------------------------------------
# Multi-scale deformable attention
# ---------------------------------------------------------------------------------------------

def naive_deformable_attention(value, shapes, locations, weights):
    """Per query, head, level and point: bilinear sample at (x*W - 0.5, y*H - 0.5), zero outside."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(N, Lq, M, D, dtype=value.dtype)
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for level, (h, w) in enumerate(shapes):
                    value_map = value[n, starts[level]:starts[level + 1], m].view(h, w, D)
                    for p in range(P):
                        x = locations[n, q, m, level, p, 0].item() * w - 0.5
                        y = locations[n, q, m, level, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(D, dtype=value.dtype)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < h and 0 <= xx < w:
                                sample += (1 - abs(x - xx)) * (1 - abs(y - yy)) * value_map[yy, xx]
                        out[n, q, m] += weights[n, q, m, level, p] * sample
    return out.flatten(2)


def test_deformable_attention_matches_a_naive_loop():
    generator = torch.Generator().manual_seed(4)
    shapes = [(3, 5), (2, 2)]
    N, Lq, M, D, L, P = 2, 3, 2, 4, len(shapes), 3
    value = torch.randn(N, sum(h * w for h, w in shapes), M, D, generator=generator, dtype=torch.float64)
    locations = torch.rand(N, Lq, M, L, P, 2, generator=generator, dtype=torch.float64) * 1.4 - 0.2  # some outside
    weights = torch.rand(N, Lq, M, L, P, generator=generator, dtype=torch.float64)
    fast = multi_scale_deformable_attention(value, shapes, locations, weights)
    assert torch.allclose(fast, naive_deformable_attention(value, shapes, locations, weights), atol=1e-10)


def test_deformable_attention_initial_offsets_and_box_references():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2)
    offsets = attn.sampling_offsets.bias.view(4, 2, 2, 2)
    assert offsets[0, 0].tolist() == [[1.0, 0.0], [2.0, 0.0]]  # head 0 points along +x, point p at p+1
    assert offsets[1, 1, 1].tolist() == pytest.approx([0.0, 2.0], abs=1e-6)  # head 1 of 4 along +y
    query, memory = torch.randn(1, 5, 16), torch.randn(1, 3 * 4 + 2 * 2, 16)
    shapes = torch.tensor([[3, 4], [2, 2]])
    out2 = attn(query, torch.rand(1, 5, 2, 2), memory, shapes)
    out4 = attn(query, torch.rand(1, 5, 2, 4), memory, shapes)
    assert out2.shape == out4.shape == (1, 5, 16)


# ---------------------------------------------------------------------------------------------
# State-dict manifests and parameter groups (real default configuration)
# ---------------------------------------------------------------------------------------------

def test_nano_student_matches_the_released_layout(nano):
    assert state_manifest(nano.state_dict()) == read_manifest("vidt_swin_nano")
    assert sum(p.numel() for p in nano.parameters()) == 16_124_965


@pytest.mark.parametrize("backbone, manifest, with_projectors, n_params", [
    ("swin_tiny", "vidt_swin_tiny", True, 38_359_189),
    ("swin_small", "vidt_swin_small", True, 60_861_349),
    ("swin_base_win7_22k", "vidt_base_teacher", False, 99_959_635),
])
def test_model_matches_the_released_layout(backbone, manifest, with_projectors, n_params):
    model = build_detector(parse_args(), backbone, "none", distil=True, with_projectors=with_projectors)
    assert state_manifest(model.state_dict()) == read_manifest(manifest)
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_parameter_groups_of_nano(nano):
    groups = param_groups(nano, weight_decay=1e-4)
    counts = [(len(g["params"]), sum(p.numel() for p in g["params"])) for g in groups]
    assert counts == [(233, 8_019_099), (135, 70_000), (81, 8_035_866)]
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0, 1e-4]


def test_nano_forward_shapes_and_projector_gradients(nano):
    samples = nested_tensor_from_images([torch.randn(3, 128, 160), torch.randn(3, 96, 128)])
    nano.train()
    out = nano(samples)
    assert out["pred_logits"].shape == (2, 100, 91) and out["pred_boxes"].shape == (2, 100, 4)
    assert len(out["aux_outputs"]) == 6
    tokens = out["distil_tokens"]
    assert [tuple(t.shape) for t in tokens["patch_token"]] == [(2 * 16 * 20, 256), (2 * 8 * 10, 256),
                                                               (2 * 4 * 5, 256), (2 * 2 * 3, 256)]
    assert tokens["body_det_token"].shape == (200, 256) and tokens["neck_det_token"].shape == (1400, 256)
    tokens["neck_det_token"].square().mean().backward()
    assert nano.neck_det_projector.projector.parametrizations.weight.original.grad.abs().sum() > 0
    nano.zero_grad()


def test_detector_without_refinement_shares_one_head():
    args = get_args_parser().parse_args(["--det_token_num", "10", "--dec_layers", "2"])
    model = build_detector(args, "swin_nano", "none", distil=False, with_projectors=False).eval()
    assert model.class_embed[0] is model.class_embed[2] and model.transformer.decoder.bbox_embed is None
    with torch.no_grad():
        out = model(nested_tensor_from_images([torch.randn(3, 64, 96)]))
    assert out["pred_boxes"].shape == (1, 10, 4) and "aux_outputs" not in out and "distil_tokens" not in out
    assert 0 < out["pred_boxes"].min() and out["pred_boxes"].max() < 1


def test_strict_loading_names_the_bad_keys(nano):
    state = nano.state_dict()
    del state["backbone.det_token"]
    state["class_embed.0.bias"] = torch.zeros(80)
    expected = (r"^test file does not fit Detector: shape mismatch: class_embed.0.bias file \[80\] vs model \[91\]; "
                r"missing from file: backbone.det_token \[1, 100, 48\]$")
    with pytest.raises(CheckpointError, match=expected):
        load_student_weights(nano, state, "test file")


def test_tgt_and_query_pos_projections_start_xavier_with_zero_bias(nano):
    """As in the original: xavier-uniform, bound sqrt(6 / (fan_in + fan_out)), instead of PyTorch's
    default conv init (bound 1 / sqrt(fan_in), 0.051 for tgt_proj's 384 inputs)."""
    for proj, fan_in in ((nano.tgt_proj[0], 384), (nano.query_pos_proj[0], 256)):
        bound = math.sqrt(6 / (fan_in + 256))
        assert proj.bias.abs().max().item() == 0.0
        assert 0.95 * bound < proj.weight.abs().max().item() <= bound
        assert proj.weight.var().item() == pytest.approx(bound ** 2 / 3, rel=0.05)  # var of U(-b, b)


def without_projectors(state):
    return {k: v for k, v in state.items() if not is_projector_key(k)}


def test_plain_vidt_file_loads_with_fresh_projectors(nano, capsys):
    state = {k: v.clone() for k, v in nano.state_dict().items()}
    before = nano.neck_det_projector.projector.parametrizations.weight.original.detach().clone()
    plain = without_projectors(state)
    plain["class_embed.0.bias"] = torch.full_like(plain["class_embed.0.bias"], 0.5)
    assert len(state) - len(plain) == 24
    try:
        assert load_student_weights(nano, plain, "plain file") is True
        assert torch.equal(nano.class_embed[0].bias, torch.full((91,), 0.5))
        assert torch.equal(nano.neck_det_projector.projector.parametrizations.weight.original, before)
        message = "plain file has no projector keys (a plain ViDT file): 24 keys of patch_projector_1"
        assert message in capsys.readouterr().out
        assert load_student_weights(nano, state, "our file") is False
    finally:
        nano.load_state_dict(state)


def test_other_mismatches_still_stop_with_the_names(nano):
    state = nano.state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("body_det_projector.")}
    with pytest.raises(CheckpointError, match=r"missing from file: body_det_projector.weight \[256\], "
                                              r"body_det_projector.bias \[256\], body_det_projector.projector"):
        load_student_weights(nano, partial, "partial file")
    plain = without_projectors(state)
    del plain["backbone.det_token"]
    with pytest.raises(CheckpointError, match=r"missing from file: backbone.det_token \[1, 100, 48\]$"):
        load_student_weights(nano, plain, "plain file")


def test_a_student_trained_here_serves_as_teacher(nano, tmp_path, capsys):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": nano.state_dict(), "epoch": 0, "args": {"backbone_name": "swin_nano"}}, path)
    teacher = build_teacher(parse_args("--distil_model", "vidt_nano", "--distil_model_path", str(path)))
    assert "its 24 projector keys (a VkD student) are not used by a teacher" in capsys.readouterr().out
    assert torch.equal(teacher.backbone.det_token, nano.backbone.det_token)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


# ---------------------------------------------------------------------------------------------
# Flags, transforms, schedule
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--iou_aware", "True"], "not supported"),
    (["--token_label", "True"], "not supported"),
    (["--lr_backbone", "2e-5"], "has no effect"),
    (["--decay-rate", "0.5"], "--decay-rate has no effect"),
    (["--backbone_name", "coat_lite_tiny"], "not supported"),
])
def test_unsupported_flags_stop_with_one_line(flags, message):
    with pytest.raises(BadInput, match=message):
        check_supported(parse_args(*flags))


def test_bare_switches_of_the_original(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    args = parse_args("--distributed", "--remove_difficult")
    assert args.distributed is True and args.remove_difficult is True
    assert parse_args("--distributed", "False").distributed is False
    with pytest.raises(BadInput, match="--remove_difficult has no effect"):
        check_supported(args)
    from vidt.main import start_runtime
    with pytest.raises(BadInput, match="--distributed needs a launcher"):
        start_runtime(parse_args("--distributed", "--device", "cpu"))


def test_bad_input_is_one_line_on_stderr_and_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "main.py", "--device", "cpu", "--iou_aware", "True", "--output_dir",
                             str(tmp_path / "run")], cwd=VIDT_DIR, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert result.returncode == 2
    assert result.stderr == "error: --iou_aware is not supported\n" and not (tmp_path / "run").exists()
    with pytest.raises(BadInput, match="--coco_path is needed"):
        check_supported(parse_args())


def test_a_config_file_sets_defaults_under_the_command_line_its_keys_checked_like_flags(tmp_path, run_entry_point):
    config = tmp_path / "nano.yaml"
    config.write_text("backbone_name: swin_nano\nbatch-size: 2\naux_loss: true\ntrain_sizes: [96, 112]\n"
                      "coco_path: coco\n")
    args, origins = parse_arguments(["--config", str(config), "--batch_size", "4"])
    assert (args.backbone_name, args.batch_size, args.aux_loss, args.train_sizes) == ("swin_nano", 4, True, [96, 112])
    assert origins == {"backbone_name": str(config), "aux_loss": str(config), "train_sizes": str(config),
                       "coco_path": str(config)}
    check_supported(args, origins)
    for content, line in [("lr_backbone: 2.0e-5\n", f"config {config}: lr-backbone has no effect here"),
                          ("iou_aware: true\n", f"config {config}: iou-aware is not supported"),
                          ("batch_size: two\n", f"config {config}: batch_size: expected an integer, got the string 'two'"),
                          ("aux_loss: 1\n", f"config {config}: aux_loss: expected True or False, got '1'"),
                          ("coco-root: coco\n", f"config {config}: unknown key 'coco-root'")]:
        config.write_text(content)
        with pytest.raises(BadInput) as refused:
            check_supported(*parse_arguments(["--config", str(config), "--coco_path", "coco"]))
        assert str(refused.value).startswith(line), str(refused.value)
    config.write_text("token_label: true\n")
    argv = ["--config", config, "--coco_path", "coco", "--device", "cpu", "--output_dir", tmp_path / "run"]
    assert run_entry_point(vidt.main, argv) == (2, "", f"error: config {config}: token-label is not supported\n")


@pytest.mark.slow
def test_runs_as_a_module_from_the_repository_root():
    """``python -m vidt.main`` from the root: --help lists the paper's flags; a bad flag is one line, exit 2."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    shown = subprocess.run([sys.executable, "-m", "vidt.main", "--help"], cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and "--distil_model_path" in shown.stdout and "--dist_timeout" in shown.stdout
    refused = subprocess.run([sys.executable, "-m", "vidt.main", "--coco-path", "coco"], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr == "error: unrecognized arguments: --coco-path coco (--help lists every flag)\n"


def test_silenced_ranks_still_print_errors(monkeypatch, capsys):
    import builtins
    monkeypatch.setattr(builtins, "print", builtins.print)  # undone after the test
    setup_for_distributed_printing(is_master=False)
    print("progress of rank 1")
    print("error: rank 1 failed", file=sys.stderr)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "error: rank 1 failed\n"


def test_boolean_flags_accept_only_true_or_false():
    assert parse_args("--eval", "TRUE").eval is True
    with pytest.raises(BadInput, match="argument --eval: expected True or False, got 'yes'"):
        parse_args("--eval", "yes")


def test_resize_floors_both_sides_to_multiples_of_16():
    assert resized_shape(640, 480, 800, 1333) == (800, 1056)
    assert resized_shape(1000, 200, 800, 1333) == (256, 1328)  # short side reduced to 267 by the cap
    assert resized_shape(500, 300, 300, None) == (288, 496)  # already at size: original floored


def test_val_transform_of_default_flags():
    from PIL import Image
    args = get_args_parser().parse_args([])
    transform = make_coco_transforms("val", args.train_sizes, args.max_size, args.eval_size)
    target = {"boxes": torch.tensor([[64.0, 48.0, 320.0, 240.0]]), "labels": torch.tensor([1]),
              "area": torch.tensor([100.0]), "iscrowd": torch.tensor([0]), "size": torch.tensor([480, 640])}
    image, target = transform(Image.new("RGB", (640, 480)), target)
    assert image.shape == (3, 800, 1056)
    assert target["boxes"][0].tolist() == pytest.approx([0.3, 0.3, 0.4, 0.4], abs=1e-6)


def test_cosine_schedule_lags_one_epoch():
    args = parse_args("--epochs", "50")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler = build_scheduler(optimizer, args)
    lrs = []
    for epoch in range(50):
        lrs.append(optimizer.param_groups[0]["lr"])
        step_scheduler(scheduler, epoch)
    cosine = [1e-7 + 0.5 * (1e-4 - 1e-7) * (1 + math.cos(math.pi * t / 50)) for t in range(50)]
    assert lrs[0] == lrs[1] == pytest.approx(1e-4)
    assert lrs[2:] == pytest.approx(cosine[1:49], rel=1e-6)


def test_step_schedule_drops_one_epoch_after_lr_drop():
    """The original calls StepLR.step(epoch) after each epoch, so epoch e runs at lr * 0.1 ** ((e-1) // lr_drop)."""
    args = parse_args("--sched", "step", "--lr_drop", "3", "--lr", "1.0")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler = build_scheduler(optimizer, args)
    lrs = []
    for epoch in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        step_scheduler(scheduler, epoch)
    assert lrs == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.1, 0.01])


class ScaledSum(torch.nn.Module):
    """Stands in for the detector: one weight times the summed images."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, samples):
        return {"value": self.weight * samples.tensors.sum()}


class FakeCriterion(torch.nn.Module):
    weight_dict = {"loss_ce": 1.0}

    def forward(self, outputs, targets, samples=None):
        return {"loss_ce": outputs["value"], "class_error": torch.zeros(())}


def test_gradient_accumulation_steps_after_every_k_micro_batches():
    images = [torch.full((3, 2, 2), float(i + 1)) for i in range(5)]  # micro-batch i sums to 12 * (i + 1)
    loader = [(nested_tensor_from_images([image]), [{}]) for image in images]
    model = ScaledSum()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(model.weight.item()))
    train_one_epoch(model, FakeCriterion(), loader, optimizer, torch.device("cpu"), epoch=0, max_norm=0,
                    n_iter_to_acc=2, print_freq=100)
    # Steps after micro-batches 2 and 4, each by the mean gradient of its two: (12 + 24) / 2, (36 + 48) / 2.
    assert steps == [1 - 18, 1 - 18 - 42]
    assert model.weight.grad.item() == pytest.approx(60 / 2)  # the fifth waits for the next epoch's first step


def test_loaders_split_the_batch_before_padding(coco_root):
    from vidt.main import make_loaders
    args = parse_args(*SMALL_IMAGE_FLAGS, "--batch_size", "4", "--n_iter_to_acc", "2", "--coco_path", str(coco_root))
    loader_train, loader_val, _ = make_loaders(args, eval_only=False)
    assert loader_train.batch_sampler.batch_size == 2 and loader_val.batch_size == 2
    assert len(loader_train) == 2  # 4 training images in micro-batches of 2, each padded on its own


def test_default_run_folder_is_the_originals_name(tmp_path):
    from vidt.util.checkpoint import run_folder
    assert run_folder(parse_args("--backbone_name", "swin_nano", "--batch_size", "2")) == \
        os.path.join("logs", "vidt-SWIN_NANO-batch-2-epoch-50")
    assert run_folder(parse_args("--output_dir", "swin_nano")) == os.path.join("logs", "swin_nano")
    assert run_folder(parse_args("--output_dir", str(tmp_path))) == str(tmp_path)


def test_slurm_exports_what_env_init_needs(monkeypatch, tmp_path):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\necho node17\necho node18\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so that what launcher_ranks exports is undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NODELIST", "node[17-18]")
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    assert launcher_ranks() == (5, 8, 1)
    assert [os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")] == \
        ["node17", "29500", "5", "8", "1"]
    monkeypatch.setenv("MASTER_PORT", "31000")
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    launcher_ranks()
    assert os.environ["MASTER_PORT"] == "31000"  # a port chosen by the job is kept


def test_a_plain_cpu_run_has_no_process_group_and_leaves_the_arguments_as_asked(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    from vidt.main import process_group_backend, start_runtime
    args = parse_args("--device", "cpu")
    asked = dict(vars(args))
    runtime = start_runtime(args)
    assert (runtime.rank, runtime.world_size, runtime.distributed, runtime.device) == (0, 1, False, torch.device("cpu"))
    assert process_group_backend(runtime.device) == "gloo" and process_group_backend(torch.device("cuda", 1)) == "nccl"
    assert vars(args) == asked


def test_paper_scripts_pass_nodes_and_master_port_to_the_launcher(tmp_path):
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\necho "$@"\n')
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), COCO="coco", TEACHER="t.pth", NNODES="2", NODE_RANK="1",
               MASTER_ADDR="10.0.0.5", MASTER_PORT="29501")
    for script in ("vidt_train_nano.sh", "vidt_eval_tiny.sh"):
        out = subprocess.run(["bash", str(REPO_ROOT / "scripts" / script)], env=env, capture_output=True, text=True,
                             timeout=30, check=True).stdout
        assert "--nnodes=2 --node_rank=1 --master_addr=10.0.0.5 --master_port=29501 --use_env main.py" in out


GROUP_MEMBER = """
import torch, torch.distributed as dist
from vidt.arguments import get_args_parser
from vidt.main import process_group_backend, start_runtime
args = get_args_parser().parse_args(["--device", "cpu"])
runtime = start_runtime(args)
total = torch.tensor([float(runtime.rank + 1)])
dist.all_reduce(total)
print(runtime.rank, runtime.world_size, process_group_backend(runtime.device), args.dist_url, int(total.item()))
dist.destroy_process_group()
"""


@pytest.mark.multiprocess
def test_two_concurrent_two_process_jobs_on_different_master_ports():
    """What torchrun / launch --use_env export: each job's group forms from its own MASTER_PORT."""
    processes = []
    for job, port in enumerate(free_ports(2)):
        for rank in range(2):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
            processes.append((job, subprocess.Popen([sys.executable, "-c", GROUP_MEMBER], env=env, text=True,
                                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
    outputs, deadline = [], time.monotonic() + 120
    try:
        for job, process in processes:
            out, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1))
            assert process.returncode == 0, out[-2000:]
            outputs.append((job, out.strip().splitlines()[-1]))
    finally:
        for _, process in processes:
            if process.poll() is None:
                process.kill()
    # Ranks 0 and 1 of each job sum 1 + 2 = 3: two separate groups of two, not one of four.
    assert outputs == [(0, "0 2 gloo env:// 3"), (0, "1 2 gloo env:// 3"), (1, "0 2 gloo env:// 3"),
                       (1, "1 2 gloo env:// 3")]


# ---------------------------------------------------------------------------------------------
# End to end through vidt/main.py on a synthetic COCO set
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic_coco"), num_train=4, num_val=2, size=(160, 128))


def save_released_form(state, path):
    """A checkpoint as NAVER/VkD release them: DETR form with an argparse.Namespace under 'args'."""
    torch.save({"model": state, "optimizer": {}, "lr_scheduler": {}, "epoch": 49,
                "args": argparse.Namespace(backbone_name="swin_nano", method="vidt")}, path)


def run_vidt_main(args, launcher=(), timeout=240):
    """Run ``python [launcher] main.py args`` from inside vidt/, as the paper's commands do."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, *launcher, "main.py", *args], cwd=VIDT_DIR, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def free_ports(count):
    """``count`` distinct free ports (held open together while chosen, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port():
    return free_ports(1)[0]


def load_eval_arrays(path, num_classes=3):
    arrays = torch.load(path, weights_only=True)
    assert arrays["precision"].shape == (10, 101, num_classes, 4, 3)  # IoU x recall x class x area x maxDets
    assert arrays["params"]["maxDets"] == [1, 10, 100]
    return arrays


def tensorboard_tags(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_fine_tuning_a_plain_vidt_file_distilled_from_a_student_trained_here(nano, coco_root, tmp_path):
    """Item by item: a plain ViDT file fine-tunes with fresh projectors, our own student file is the
    teacher, and the run folder holds args.json, tensorboard scalars, log.txt and COCOeval's arrays."""
    plain_path, teacher_path = tmp_path / "vidt_nano_50.pth", tmp_path / "teacher.pth"
    save_released_form(without_projectors(nano.state_dict()), plain_path)
    torch.save({"model": nano.state_dict(), "epoch": 0, "args": {"backbone_name": "swin_nano"}}, teacher_path)
    out_dir = tmp_path / "run"
    stdout = run_vidt_main([*PAPER_FLAGS, *SMALL_IMAGE_FLAGS, "--backbone_name", "swin_nano", "--epochs", "1",
                            "--batch_size", "2", "--distil_model", "vidt_nano", "--distil_model_path",
                            str(teacher_path), "--resume", str(plain_path), "--coco_path", str(coco_root),
                            "--output_dir", str(out_dir)])
    assert "its 24 projector keys (a VkD student) are not used by a teacher" in stdout
    assert "has no projector keys (a plain ViDT file): 24 keys" in stdout
    assert "fine-tuning from the plain ViDT weights" in stdout
    assert "number of params: 16124965" in stdout
    assert stdout.count("Epoch: [0] [") == 2 and "loss_distil" in stdout
    assert COCO_SUMMARY_LINE in stdout
    assert "Namespace(" not in stdout and "dist_url" not in stdout  # no raw argument dump

    checkpoint = torch.load(out_dir / "checkpoint.pth", weights_only=True)  # our args are a plain dict
    assert state_manifest(checkpoint["model"]) == read_manifest("vidt_swin_nano")
    assert checkpoint["epoch"] == 0 and checkpoint["args"]["distil_model"] == "vidt_nano"
    assert checkpoint["world_size"] == 1 and "gpu" not in checkpoint["args"]
    run = json.loads((out_dir / "args.json").read_text())
    assert len(run["git_commit"]) == 40 and "--distil_model_path" in run["command"]
    assert (run["backend"], run["processes"], run["args"]["output_dir"]) == ("gloo", 1, str(out_dir))
    # The arguments as asked: the file resumed, the first epoch and the hidden --dist-backend as given.
    assert (run["args"]["resume"], run["args"]["start_epoch"], run["args"]["dist_backend"]) == (str(plain_path), 0,
                                                                                                "nccl")
    log = json.loads((out_dir / "log.txt").read_text().splitlines()[0])
    assert len(log["test_coco_eval_bbox"]) == 12 and log["train_loss_distil"] > 0
    latest = load_eval_arrays(out_dir / "eval" / "latest.pth")
    assert torch.equal(latest["precision"], load_eval_arrays(out_dir / "eval" / "000.pth")["precision"])
    scalars = tensorboard_tags(out_dir / "tensorboard")
    assert len(scalars["train/loss_distil"]) == 2 and scalars["train/lr"] == pytest.approx([1e-4, 1e-4])
    assert scalars["val/AP"] == pytest.approx([log["test_coco_eval_bbox"][0]])


def test_evaluation_of_a_plain_vidt_file_writes_the_eval_arrays(nano, coco_root, tmp_path):
    path = tmp_path / "vidt_nano_50.pth"
    save_released_form(without_projectors(nano.state_dict()), path)
    out_dir = tmp_path / "eval"
    stdout = run_vidt_main([*PAPER_FLAGS, *SMALL_IMAGE_FLAGS, "--backbone_name", "swin_nano", "--batch_size", "2",
                            "--eval", "True", "--resume", str(path), "--coco_path", str(coco_root),
                            "--output_dir", str(out_dir)])
    assert f"resumed from {path}" in stdout and COCO_SUMMARY_LINE in stdout
    stats = json.loads((out_dir / "eval_stats.json").read_text())["stats"]
    arrays = load_eval_arrays(out_dir / "eval.pth")
    precision = arrays["precision"][:, :, :, 0, 2]  # all areas, 100 detections
    assert stats["AP"] == pytest.approx(precision[precision > -1].mean().item() if (precision > -1).any() else -1)


@pytest.mark.multiprocess
def test_two_process_gloo_training_and_evaluation(coco_root, tmp_path):
    launcher = ["-m", "torch.distributed.launch", "--nproc_per_node=2", "--nnodes=1", "--use_env",
                f"--master_port={free_port()}"]
    out_dir = tmp_path / "ddp"
    stdout = run_vidt_main([*PAPER_FLAGS, *SMALL_IMAGE_FLAGS, "--backbone_name", "swin_nano", "--epochs", "1",
                            "--batch_size", "1", "--coco_path", str(coco_root), "--output_dir", str(out_dir)],
                           launcher=launcher)
    assert "distributed init (rank 0 of 2, gloo): env://" in stdout
    assert stdout.count(f"{COCO_SUMMARY_LINE} | area=   all") == 1  # one summary, printed by rank 0
    assert (out_dir / "checkpoint.pth").exists()


@pytest.mark.slow
def test_a_run_folder_holding_a_run_is_refused_or_moved_aside(tmp_path):
    """A new detection run never destroys an old one: refused, or with --overwrite moved aside."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pth").write_bytes(b"an earlier run's weights")
    flags = ["--device", "cpu", "--output_dir", str(run_dir), "--coco_path", str(tmp_path / "no_coco")]
    result = subprocess.run([sys.executable, "main.py", *flags], cwd=VIDT_DIR, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert result.returncode == 2
    assert "already holds a run (checkpoint.pth)" in result.stderr and "--overwrite" in result.stderr
    assert (run_dir / "checkpoint.pth").read_bytes() == b"an earlier run's weights"

    subprocess.run([sys.executable, "main.py", *flags, "--overwrite"], cwd=VIDT_DIR, capture_output=True,
                   text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    [aside] = [path for path in tmp_path.iterdir() if path.name.startswith("run.previous-")]
    assert (aside / "checkpoint.pth").read_bytes() == b"an earlier run's weights"
