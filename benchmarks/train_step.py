"""Time the whole VkD training step on synthetic in-memory batches; print one JSON line.

The step is the engine's: the student's training view (``models.students.TrainingView``: its forward with the
projected feature), the ``vkd`` distiller (frozen teacher forward, CE + KD + feature terms), backward, AdamW step with the recipe's parameter groups
(wd 0.05 except 1-D, biases and no_weight_decay names). The teacher is built with random weights
(pretrained=False): the timing does not depend on them. Also timed separately on the same shapes:
the projector's forward+backward, the teacher's forward and the student's forward+backward.

    .venv/bin/python -m benchmarks.train_step --projector-impl fast --steps 5 --warmup 2
    .venv/bin/python -m benchmarks.train_step --projector-impl torch --steps 3 --warmup 1
    .venv/bin/python -m benchmarks.train_step --compile teacher --steps 5 --warmup 2

With ``--compile``, the timed step is the compiled one and ``first_step_s`` holds the compilation.
"""
import argparse
import json
import resource
import statistics
import sys
import time

import timm
import torch
import torch.nn as nn

from distillers import method_args
from distillers.vkd import VkD
from models import create_student
from models.students import TrainingView
from optim import parameter_groups
from vkd.losses import feature_width
from vkd.orthogonal_maps import ORTHOGONAL_MAPS

AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILE_CHOICES = ("none", "teacher", "student", "both")
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
    parser.add_argument("--orthogonal-map", choices=ORTHOGONAL_MAPS, default=None,
                        help="default: torch's choice for the shape (householder when non-square)")
    parser.add_argument("--optimizer-impl", choices=("default", "fused"), default="default",
                        help="AdamW implementation: torch's default (for-loop on CPU, foreach on CUDA) or fused")
    parser.add_argument("--teacher-channels-last", action="store_true",
                        help="store the teacher's weights channels-last (default: on, as training does)")
    parser.add_argument("--no-teacher-channels-last", action="store_false", dest="teacher_channels_last")
    parser.set_defaults(teacher_channels_last=True)
    parser.add_argument("--compile", choices=COMPILE_CHOICES, default="none",
                        help="torch.compile (inductor) the frozen teacher (as training's --compile does), the student, "
                             "or both; the first warm-up step compiles and its time is reported as first_step_s")
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


class TrainStep:
    """Models, optimizer and one synthetic batch for ``args``; ``step()`` runs one training step."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        self.amp_dtype = AMP_DTYPES[args.amp]
        torch.manual_seed(0)
        self.teacher = timm.create_model(args.teacher, pretrained=False, num_classes=1000).to(self.device)
        if args.teacher_channels_last:
            # Weights alone suffice: convolutions follow the weight's memory format.
            self.teacher.to(memory_format=torch.channels_last)
        self.student = create_student(args.student, num_classes=1000, img_size=args.input_size,
                                      teacher_dim=feature_width(self.teacher), orthogonal_map=args.orthogonal_map,
                                      projector_impl=args.projector_impl).to(self.device).train()
        compile_teacher = args.compile in ("teacher", "both")
        self.criterion = VkD(method_args(), self.teacher, nn.CrossEntropyLoss(label_smoothing=0.1),
                             compile_backend="inductor" if compile_teacher else None).train()
        # The timed step calls the compiled student; the component timings below use the eager one.
        view = TrainingView(self.student, with_features=True)
        self.trained = torch.compile(view) if args.compile in ("student", "both") else view
        fused = {"fused": True} if args.optimizer_impl == "fused" else {}
        self.optimizer = torch.optim.AdamW(parameter_groups(self.student, WEIGHT_DECAY), lr=LR, **fused)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        generator = torch.Generator().manual_seed(0)
        shape = (args.batch_size, 3, args.input_size, args.input_size)
        self.samples = torch.randn(shape, generator=generator).to(self.device)
        self.targets = torch.randint(0, 1000, (args.batch_size,), generator=generator).to(self.device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def step(self) -> float:
        """One training step; returns its wall time in seconds."""
        synchronize(self.device)
        start = time.perf_counter()
        with self.autocast():
            terms = self.criterion(self.samples, self.trained(self.samples), self.targets)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - start

    def component_ms(self, repeats: int):
        """Median ms of the projector's fwd+bwd, the teacher's forward and the student's fwd+bwd."""
        with torch.no_grad(), self.autocast():
            features = self.student.forward_features(self.samples)[2].mean(1)

        def projector_step():
            with self.autocast():
                self.student.projector(features).float().square().mean().backward()

        def teacher_forward():
            with torch.no_grad(), self.autocast():
                self.teacher.forward_head(self.teacher.forward_features(self.samples))

        def student_step():
            with self.autocast():
                cls_logits, dist_logits = self.student(self.samples)
                (cls_logits.float().mean() + dist_logits.float().mean()).backward()

        times = {name: timed(fn, self.device, repeats) for name, fn in
                 (("projector_ms", projector_step), ("teacher_ms", teacher_forward), ("student_ms", student_step))}
        self.optimizer.zero_grad(set_to_none=True)
        return times

    def peak_mem_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv=None):
    args = parse_args(argv)
    bench = TrainStep(args)
    all_steps = [bench.step() for _ in range(args.warmup + args.steps)]
    step_times = all_steps[args.warmup:]
    peak_mem_mb = bench.peak_mem_mb()
    # Fewer repeats for the components: torch's projector takes seconds per call.
    components = bench.component_ms(repeats=max(1, min(3, args.steps)))
    step_s_median = statistics.median(step_times)
    print(json.dumps({
        "img_per_s": round(args.batch_size / step_s_median, 3),
        "step_s_median": round(step_s_median, 4),
        "step_s_min": round(min(step_times), 4),
        "step_s_max": round(max(step_times), 4),
        "first_step_s": round(all_steps[0], 3),  # with --compile: includes compiling
        "projector_ms": round(components["projector_ms"], 2),
        "projector_share": round(components["projector_ms"] / 1000 / step_s_median, 4),
        "teacher_ms": round(components["teacher_ms"], 1),
        "student_ms": round(components["student_ms"], 1),
        "peak_mem_mb": round(peak_mem_mb, 1),
        "device": torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **vars(args),
    }))


if __name__ == "__main__":
    sys.exit(main())
