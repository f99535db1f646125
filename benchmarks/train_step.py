"""Time the whole VkD training step on synthetic in-memory batches; print one JSON line.

The step is the engine's: student forward with the projected feature, ``losses.VkDLoss`` (frozen
teacher forward, CE + KD + feature terms), backward, AdamW step with the recipe's parameter groups
(wd 0.05 except 1-D, biases and no_weight_decay names). The teacher is built with random weights
(pretrained=False): the timing does not depend on them. Also timed separately on the same shapes:
the projector's forward+backward, the teacher's forward and the student's forward+backward.

    PYTHONPATH=. .venv/bin/python benchmarks/train_step.py --projector-impl fast --steps 5 --warmup 2
    PYTHONPATH=. .venv/bin/python benchmarks/train_step.py --projector-impl torch --steps 3 --warmup 1
"""
import argparse
import json
import statistics
import sys
import time

import timm
import torch
import torch.nn as nn

import models  # noqa: F401  (registers the students with timm)
from losses import VkDLoss
from main_distributed import parameter_groups
from models import create_student

AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHT_DECAY = 0.05
LR = 5e-4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="deit_ti_distilled")
    parser.add_argument("--teacher", default="regnety_160")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default="none")
    parser.add_argument("--projector-impl", choices=("fast", "torch"), default="fast")
    parser.add_argument("--orthogonal-map", default=None,
                        help="householder | matrix_exp | cayley | qr (default: torch's choice for the shape)")
    parser.add_argument("--optimizer-impl", choices=("for-loop", "foreach", "fused"), default="for-loop",
                        help="AdamW implementation (default for-loop, torch's CPU default)")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after one untimed call, in ms."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def build(args, device: torch.device):
    torch.manual_seed(0)
    teacher = timm.create_model(args.teacher, pretrained=False, num_classes=1000).to(device)
    student = create_student(args.student, num_classes=1000, img_size=args.input_size,
                             teacher_dim=teacher.num_features, orthogonal_map=args.orthogonal_map,
                             projector_impl=args.projector_impl).to(device)
    criterion = VkDLoss(teacher, nn.CrossEntropyLoss(label_smoothing=0.1))
    impl = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    optimizer = torch.optim.AdamW(parameter_groups(student, WEIGHT_DECAY), lr=LR, **impl[args.optimizer_impl])
    return teacher, student, criterion, optimizer


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    amp_dtype = AMP_DTYPES[args.amp]
    teacher, student, criterion, optimizer = build(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    student.train()
    criterion.train()
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=generator).to(device)
    targets = torch.randint(0, 1000, (args.batch_size,), generator=generator).to(device)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def train_step():
        with autocast():
            terms = criterion(samples, student(samples, with_projection=True), targets)
        scaler.scale(terms["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    step_times = []
    for index in range(args.warmup + args.steps):
        synchronize(device)
        start = time.perf_counter()
        train_step()
        synchronize(device)
        if index >= args.warmup:
            step_times.append(time.perf_counter() - start)
    peak_mem_mb = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
                   else _max_rss_mb())

    # Components on the same shapes; fewer repeats, as torch's projector takes seconds per call.
    repeats = max(1, min(3, args.steps))
    with torch.no_grad(), autocast():
        features = student.forward_features(samples)[2].mean(1)

    def projector_step():
        with autocast():
            student.projector(features).float().square().mean().backward()

    def teacher_forward():
        with torch.no_grad(), autocast():
            teacher.forward_head(teacher.forward_features(samples))

    def student_step():
        with autocast():
            cls_logits, dist_logits = student(samples)
            (cls_logits.float().mean() + dist_logits.float().mean()).backward()

    projector_ms = timed(projector_step, device, repeats)
    teacher_ms = timed(teacher_forward, device, repeats)
    student_ms = timed(student_step, device, repeats)
    optimizer.zero_grad(set_to_none=True)

    step_s_median = statistics.median(step_times)
    print(json.dumps({
        "img_per_s": round(args.batch_size / step_s_median, 3),
        "step_s_median": round(step_s_median, 4),
        "step_s_min": round(min(step_times), 4),
        "step_s_max": round(max(step_times), 4),
        "projector_ms": round(projector_ms, 2),
        "projector_share": round(projector_ms / 1000 / step_s_median, 4),
        "teacher_ms": round(teacher_ms, 1),
        "student_ms": round(student_ms, 1),
        "peak_mem_mb": round(peak_mem_mb, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **vars(args),
    }))


def _max_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


if __name__ == "__main__":
    sys.exit(main())
