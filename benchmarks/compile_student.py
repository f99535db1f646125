"""Where a torch.compile'd student's training time goes; print one JSON line.

A training run calls the student on full batches, in eval mode for validation (whose last batch is smaller),
and, with a loader that keeps it, on an epoch's last, smaller batch. Each new batch size and the eval mode
are new guards for torch.compile, so each compiles again.
This script times, on synthetic batches, the eager step, then the compiled student through that sequence:
the first step (compiling), steady steps, the last partial batch, an eval call, and steps again. It also
counts graphs and graph breaks (``torch._dynamo.explain``). Inductor's on-disk cache is pointed at a fresh
folder, so every compilation is measured cold.

    .venv/bin/python -m benchmarks.compile_student --threads 2
"""
import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

CACHE = tempfile.mkdtemp(prefix="inductor-cache-")
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)  # also after --help, an error or an import
os.environ["TORCHINDUCTOR_CACHE_DIR"] = CACHE  # read when torch is imported: cold compiles only

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import create_student  # noqa: E402
from vkd.runs import cpu_model  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="deit_ti_distilled")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--last-batch", type=int, default=16, help="the epoch's last, smaller batch (default 16)")
    parser.add_argument("--eval-batch", type=int, default=96, help="validation batch (default 96)")
    parser.add_argument("--steps", type=int, default=5, help="timed steady steps, eager and compiled (default 5)")
    parser.add_argument("--teacher-dim", type=int, default=512, help="the projector's output (resnet10t: 512)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    return parser.parse_args(argv)


class Student:
    def __init__(self, args, compiled: bool):
        torch.manual_seed(0)
        self.module = create_student(args.student, num_classes=10, img_size=args.input_size,
                                     teacher_dim=args.teacher_dim).train()
        self.call = torch.compile(self.module) if compiled else self.module
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=1e-4)
        self.input_size = args.input_size

    def batch(self, size: int):
        generator = torch.Generator().manual_seed(size)
        return (torch.randn(size, 3, self.input_size, self.input_size, generator=generator),
                torch.randint(0, 10, (size,), generator=generator))

    def train_step(self, size: int) -> float:
        images, targets = self.batch(size)
        start = time.perf_counter()
        cls_logits, dist_logits, projected = self.call(images, with_projection=True)
        loss = F.cross_entropy(cls_logits, targets) + F.cross_entropy(dist_logits, targets) + projected.square().mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def eval_call(self, size: int) -> float:
        images, _ = self.batch(size)
        self.module.eval()
        start = time.perf_counter()
        with torch.no_grad():
            self.call(images)
        self.module.train()
        return time.perf_counter() - start


def steady_ms(student: Student, size: int, steps: int) -> float:
    return 1000 * statistics.median(student.train_step(size) for _ in range(steps))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    eager = Student(args, compiled=False)
    eager.train_step(args.batch_size)
    eager_ms = steady_ms(eager, args.batch_size, args.steps)

    explained = torch._dynamo.explain(Student(args, compiled=False).module)(eager.batch(2)[0], with_projection=True)
    torch._dynamo.reset()
    compiled = Student(args, compiled=True)
    first_s = compiled.train_step(args.batch_size)
    compiled_ms = steady_ms(compiled, args.batch_size, args.steps)
    last_batch_s = compiled.train_step(args.last_batch)
    eval_s = compiled.eval_call(args.eval_batch)
    again_ms = steady_ms(compiled, args.batch_size, args.steps)
    report = {
        "eager_step_ms": round(eager_ms, 1), "compiled_step_ms": round(compiled_ms, 1),
        "compiled_step_ms_after_recompiles": round(again_ms, 1),
        "steady_speedup": round(eager_ms / compiled_ms, 3),
        "first_step_s": round(first_s, 2), "last_batch_first_call_s": round(last_batch_s, 2),
        "eval_first_call_s": round(eval_s, 2),
        "graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
        # Full steps the steady gain needs to pay back the three compilations (None: the compiled step is slower).
        "break_even_steps": (round((first_s + last_batch_s + eval_s) / ((eager_ms - compiled_ms) / 1000))
                             if compiled_ms < eager_ms else None),
        "torch": torch.__version__, "cpu": cpu_model(), **vars(args),
    }
    print(f"eager step {eager_ms:.0f} ms, compiled {compiled_ms:.0f} ms; compiling: first step {first_s:.1f} s, "
          f"last partial batch {last_batch_s:.1f} s, eval mode {eval_s:.1f} s")
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
