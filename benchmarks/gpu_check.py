"""The GPU check: what the CPU tests stand in for, run on one GPU in about ten minutes, its results in one JSON file.

    python -m benchmarks.gpu_check                        # from the repository root, on the GPU machine
    python -m benchmarks.gpu_check --steps parity,fp16    # some of the steps
    python -m benchmarks.gpu_check --output $OUT/gpu_check.json --work /tmp/gpu_check

The steps (each records its outcome, seconds and figures; one that fails does not stop the others):
  parity      the projector (output, gradient; both of its forward paths) on CUDA against the CPU, and under fp16
              and bf16 autocast; ZCA and Cholesky whitening on CUDA against the CPU and under autocast and TF32;
              the CUDA generator saved and restored, in today's format and in the older per-device list
  fp16        main_distributed.py on DIGITS with fp16 AMP through the GradScaler (2 epochs)
  nccl        torchrun --nproc_per_node=1: one rank in an nccl process group, the student in DDP, bf16, the
              compiled teacher (2 epochs); and --teacher-cache refused on the GPU with one line, exit 2
  preempt     that run (4 epochs, same flags) stopped by SIGUSR1 in epoch 1 (exit 124), then --resume auto to
              the end
  cache_cost  the teacher cache's lookup of a 512 x 3 x 224 x 224 batch against regnety_160's fp16 forward: what
              its refusal on a GPU rests on
  benchmark   benchmarks/gpu.sh: the VkD step of DeiT-Ti and DeiT-S at batch 256 in fp16, evaluation img/s
Needs torch, timm and scikit-learn (DIGITS). Without a CUDA device it stops at once: one line, exit code 2.
"""
import argparse
import copy
import datetime
import json
import os
import platform
import runpy
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

import torch

from vkd.cli import entry_point
from vkd.config import OneLineErrorParser
from vkd.errors import BadInput, RunFailed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO, "benchmarks", "results", "gpu_check.json")
DDP_RANK = "--ddp-rank"  # internal: run main_distributed.py as one rank of a process group
RUN_TIMEOUT_S = 300  # one training run; the check as a whole stays near ten minutes
BENCHMARK_TIMEOUT_S = 420
TEACHER = "resnet10t"


# ============================================================================ the steps


def parity(work: str) -> dict:
    from vkd.norms import whiten, whiten_cholesky
    from vkd.projector import OrthogonalProjector
    figures, problems = {}, []

    def check(name: str, value: float, limit: float) -> None:
        figures[name] = value
        if not value <= limit:
            problems.append(f"{name} {value:.3g} > {limit:g}")

    torch.manual_seed(0)
    projector = OrthogonalProjector(192, 3024)
    on_gpu = copy.deepcopy(projector).cuda()
    for rows in (64, 256):  # below the width, W is never formed; above, it is
        x = torch.randn(rows, 192)
        expected, expected_grad = _output_and_grad(projector, x)
        output, grad = _output_and_grad(on_gpu, x.cuda())
        check(f"projector_{rows}_cuda_vs_cpu", _relative(output, expected), 1e-5)
        check(f"projector_{rows}_grad_cuda_vs_cpu", _relative(grad, expected_grad), 1e-4)
        for dtype, limit in ((torch.float16, 5e-3), (torch.bfloat16, 3e-2)):
            with torch.autocast("cuda", dtype):
                check(f"projector_{rows}_{_name(dtype)}_vs_fp32", _relative(on_gpu(x.cuda()).float(), expected), limit)
    x = torch.randn(64, 512, device="cuda")
    for whitening, limit in ((whiten, 1e-3), (whiten_cholesky, 1e-6)):
        expected = whitening(x)
        check(f"{whitening.__name__}_cuda_vs_cpu", _relative(expected, whitening(x.cpu())), limit)
        for dtype in (torch.float16, torch.bfloat16):
            with torch.autocast("cuda", dtype):
                check(f"{whitening.__name__}_{_name(dtype)}_vs_fp32", _relative(whitening(x), expected), 0.0)
        torch.set_float32_matmul_precision("high")  # TF32, as a user may enable it
        try:
            check(f"{whitening.__name__}_tf32_vs_fp32", _relative(whitening(x), expected), 0.0)
        finally:
            torch.set_float32_matmul_precision("highest")
    figures.update(_generator_round_trip(problems))
    figures["bf16_supported"] = torch.cuda.is_bf16_supported(including_emulation=False)
    return _outcome(figures, problems)


def fp16_run(work: str) -> dict:
    out = os.path.join(work, "fp16")
    result = _run(_training_command(work, out, "--amp", "fp16", "--epochs", "2"), os.path.join(work, "fp16.log"))
    if result["rc"] != 0:
        return _failed_run(result)
    from vkd.checkpoints import safe_torch_load
    checkpoint = safe_torch_load(os.path.join(out, "latest.pth.tar"))
    losses = [record["train_loss"] for record in _log(out)]
    figures = {"train_loss": losses, "grad_scale": checkpoint["scaler"].get("scale"),
               "amp": checkpoint["args"]["amp"], "seconds": result["seconds"]}
    problems = [] if len(losses) == 2 and checkpoint["args"]["amp"] == "fp16" and figures["grad_scale"] else [
        "expected 2 epochs of fp16 training with the GradScaler enabled"]
    return _outcome(figures, problems)


def nccl_run(work: str) -> dict:
    out = os.path.join(work, "nccl")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
               "benchmarks.gpu_check", DDP_RANK, *_training_flags(work, out, *_ddp_flags(work), "--epochs", "2")]
    result = _run(command, os.path.join(work, "nccl.log"))
    if result["rc"] != 0:
        return _failed_run(result)
    records = _log(out)
    # On a GPU the teacher cache is refused at start-up (hashing a batch on the host costs more than the teacher).
    cached = _run(_training_command(work, os.path.join(work, "cache_refused"), "--epochs", "1", "--teacher-cache",
                                    os.path.join(work, "teacher_cache")), os.path.join(work, "cache_refused.log"))
    figures = {"backend": _backend_line(result["output"]), "train_loss": [r["train_loss"] for r in records],
               "teacher_cache_refusal": _last_line(cached["output"]), "seconds": result["seconds"]}
    problems = []
    if figures["backend"] != "nccl 1":
        problems.append(f"expected one rank in an nccl group, got {figures['backend']!r}")
    if len(records) != 2:
        problems.append("expected 2 epochs")
    if cached["rc"] != 2 or "--teacher-cache hashes every input batch" not in cached["output"]:
        problems.append(f"expected --teacher-cache refused on a GPU with exit 2, got {cached['rc']}")
    return _outcome(figures, problems)


def preempted_run(work: str) -> dict:
    out = os.path.join(work, "preempt")
    command = [sys.executable, "-m", "benchmarks.gpu_check", DDP_RANK,
               *_training_flags(work, out, *_ddp_flags(work), "--epochs", "4", "--resume", "auto")]
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    sent = []

    def stop_in_epoch_1(line: str, process: subprocess.Popen) -> None:
        if not sent and line.startswith("Epoch: [1]"):
            os.kill(process.pid, signal.SIGUSR1)  # the rank itself, as Slurm's --signal does
            sent.append(time.time())

    stopped = _run(command, os.path.join(work, "preempt.log"), env=env, on_line=stop_in_epoch_1)
    resumed = _run(command, os.path.join(work, "resume.log"), env=dict(env, MASTER_PORT=str(_free_port())))
    stop_line = next((line for line in stopped["output"].splitlines() if line.startswith("stopped: ")), None)
    records = _log(out) if resumed["rc"] == 0 else []
    epochs = [record["epoch"] for record in records]
    figures = {"stop_rc": stopped["rc"], "stop_line": stop_line, "resume_rc": resumed["rc"], "epochs": epochs,
               "seconds": stopped["seconds"] + resumed["seconds"]}
    problems = []
    if not sent or stopped["rc"] != 124 or not stop_line:
        problems.append(f"expected a stop with exit 124 after SIGUSR1, got {stopped['rc']}: "
                        f"{_last_line(stopped['output'])}")
    if resumed["rc"] != 0 or epochs != [0, 1, 2, 3]:
        problems.append(f"expected --resume auto to finish epochs 0-3, got rc {resumed['rc']}, epochs {epochs}: "
                        f"{_last_line(resumed['output'])}")
    return _outcome(figures, problems)


def cache_cost(work: str) -> dict:
    import timm

    from distillers.teacher_cache import TeacherCache
    from vkd.losses import features_and_logits
    torch.manual_seed(0)
    teacher = timm.create_model("regnety_160", pretrained=False).cuda().eval().to(memory_format=torch.channels_last)
    samples = torch.randn(512, 3, 224, 224, device="cuda")

    def forward(images):
        with torch.no_grad(), torch.autocast("cuda", torch.float16):
            return features_and_logits(teacher, images)

    cache = TeacherCache(os.path.join(work, "cache_cost"), teacher, identity={"check": "gpu_check"})
    with torch.autocast("cuda", torch.float16):
        cache.outputs(samples, forward)  # a miss: computes and writes the entry
        hit_ms = _median_ms(lambda: cache.outputs(samples, forward))
    forward_ms = _median_ms(lambda: forward(samples))
    return _outcome({"batch": list(samples.shape), "teacher_forward_ms": forward_ms, "cache_hit_ms": hit_ms,
                     "hit_over_forward": hit_ms / forward_ms}, [])


def benchmark(work: str) -> dict:
    out = os.path.join(work, "gpu")
    result = _run(["bash", os.path.join(REPO, "benchmarks", "gpu.sh")], os.path.join(work, "gpu.log"),
                  env=dict(PY=sys.executable, OUT=out), timeout=BENCHMARK_TIMEOUT_S)
    if result["rc"] != 0:
        return _failed_run(result)
    with open(os.path.join(out, "gpu.jsonl")) as handle:
        return _outcome({"measurements": [json.loads(line) for line in handle if line.strip()],
                         "seconds": result["seconds"]}, [])


STEPS: Dict[str, Callable[[str], dict]] = {"parity": parity, "fp16": fp16_run, "nccl": nccl_run,
                                           "preempt": preempted_run, "cache_cost": cache_cost, "benchmark": benchmark}


# ============================================================================ helpers


def _output_and_grad(projector, x):
    projector.zero_grad()
    output = projector(x)
    output.square().sum().backward()
    return output.detach().float().cpu(), projector.parametrizations.weight.original.grad.float().cpu()


def _relative(value: torch.Tensor, expected: torch.Tensor) -> float:
    value, expected = value.float().cpu(), expected.float().cpu()
    return ((value - expected).norm() / expected.norm()).item()


def _name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _generator_round_trip(problems: List[str]) -> dict:
    """The CUDA generator restored from ``rng_states``, and from the per-device list older checkpoints hold."""
    from vkd.preemption import rng_states, set_rng_states
    torch.cuda.manual_seed(0)
    states = rng_states()
    older = dict(states, cuda=[torch.cuda.get_rng_state(index) for index in range(torch.cuda.device_count())])
    drawn = torch.rand(4, device="cuda")
    restored = {}
    for name, saved in (("rng_restored", states), ("rng_older_format_restored", older)):
        set_rng_states(saved)
        restored[name] = torch.equal(torch.rand(4, device="cuda"), drawn)
        if not restored[name]:
            problems.append(f"{name}: the CUDA generator drew other numbers after its state was restored")
    return restored


def _outcome(figures: dict, problems: List[str]) -> dict:
    return dict(figures, ok=not problems, **({"problems": problems} if problems else {}))


def _failed_run(result: dict) -> dict:
    return {"ok": False, "rc": result["rc"], "timed_out": result["timed_out"], "last_line": _last_line(result["output"]),
            "log": result["log"]}


def _last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _median_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ddp_flags(work: str) -> List[str]:
    return ["--amp", "bf16", "--compile"]


def _teacher_file(work: str) -> str:
    path = os.path.join(work, "teacher.pth")
    if not os.path.exists(path):
        import timm
        torch.manual_seed(0)
        torch.save({"model": timm.create_model(TEACHER, num_classes=10).state_dict()}, path)
    return path


def _training_flags(work: str, output_dir: str, *extra: str) -> List[str]:
    return ["--data-set", "DIGITS", "--data-path", os.path.join(work, "digits"), "--input-size", "32",
            "--teacher", TEACHER, "--teacher-path", _teacher_file(work), "--batch-size", "64", "--num_workers", "4",
            "--print-freq", "5", "--output_dir", output_dir, *extra]


def _training_command(work: str, output_dir: str, *extra: str) -> List[str]:
    return [sys.executable, os.path.join(REPO, "main_distributed.py"), *_training_flags(work, output_dir, *extra)]


def _log(output_dir: str) -> List[dict]:
    with open(os.path.join(output_dir, "log.txt")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _backend_line(output: str) -> Optional[str]:
    for line in output.splitlines():
        if line.startswith("gpu_check: process group "):
            return line.split("gpu_check: process group ", 1)[1]
    return None


def _run(command: List[str], log: str, env: Optional[dict] = None, timeout: float = RUN_TIMEOUT_S,
         on_line: Optional[Callable[[str, subprocess.Popen], None]] = None) -> dict:
    """Runs ``command`` from the repository root, its output into ``log`` and the result; killed (with its
    children) after ``timeout`` seconds, so that nothing hangs."""
    started = time.time()
    environment = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1", **(env or {}))
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    timer = threading.Timer(timeout, lambda: os.killpg(process.pid, signal.SIGKILL))
    timer.start()
    lines = []
    try:
        with open(log, "w") as handle:
            for line in process.stdout:
                handle.write(line)
                lines.append(line)
                if on_line is not None:
                    on_line(line, process)
        rc = process.wait()
    finally:
        timed_out = not timer.is_alive()
        timer.cancel()
    return {"rc": rc, "timed_out": timed_out, "output": "".join(lines), "log": log,
            "seconds": round(time.time() - started, 1)}


def _machine() -> dict:
    properties = torch.cuda.get_device_properties(0)
    return {"gpu": torch.cuda.get_device_name(0), "gpu_memory_gib": round(properties.total_memory / 2 ** 30, 1),
            "capability": f"{properties.major}.{properties.minor}", "gpus_visible": torch.cuda.device_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "host": platform.node()}


def _require_a_gpu_and_the_packages() -> None:
    if not torch.cuda.is_available():
        raise BadInput("no CUDA device is visible (torch.cuda.is_available() is False): the GPU check runs on a "
                       "machine with a GPU")
    for module, package in (("timm", "timm"), ("sklearn", "scikit-learn")):
        try:
            __import__(module)
        except ImportError:
            raise BadInput(f"the GPU check needs {package}: pip install {package}") from None


def run_as_ddp_rank(argv: List[str]) -> None:
    """main_distributed.py as one rank of a process group even when it is the only one (nccl on a GPU, the
    student in DDP), which a single process otherwise skips; prints the group's backend and size."""
    from vkd import distributed
    joined = distributed.join_process_group

    def join_and_say(*args, **kwargs):
        joined(*args, **kwargs)
        print(f"gpu_check: process group {torch.distributed.get_backend()} {torch.distributed.get_world_size()}",
              flush=True)

    distributed.Runtime.distributed = property(lambda runtime: True)
    distributed.join_process_group = join_and_say
    entry = os.path.join(REPO, "main_distributed.py")
    sys.argv = [entry, *argv]
    runpy.run_path(entry, run_name="__main__")  # run as its command line, not imported


def step_names(text: str) -> list:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in STEPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    return names


def parse_arguments(argv):
    parser = OneLineErrorParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default=STEPS, type=step_names,
                        help=f"comma-separated, of {', '.join(STEPS)} (default: all)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="the JSON file of results (default: %(default)s)")
    parser.add_argument("--work", default=os.path.join(REPO, "runs", "gpu_check"),
                        help="runs, logs and data (default: %(default)s)")
    return parser.parse_args(argv)


@entry_point
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [DDP_RANK]:
        return run_as_ddp_rank(argv[1:])
    args = parse_arguments(argv)
    _require_a_gpu_and_the_packages()
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    report = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **_machine(), "steps": {}}
    for name in args.steps:
        started = time.time()
        try:
            outcome = STEPS[name](args.work)
        except Exception as error:  # recorded, and the other steps still run
            outcome = {"ok": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        outcome["step_seconds"] = round(time.time() - started, 1)
        report["steps"][name] = outcome
        print(f"gpu_check: {name}: {'ok' if outcome['ok'] else 'FAILED'} ({outcome['step_seconds']} s)", flush=True)
        with open(args.output, "w") as handle:  # after every step: a check cut short keeps what it measured
            json.dump(report, handle, indent=1, default=str)
    failed = [name for name, outcome in report["steps"].items() if not outcome["ok"]]
    if failed:
        raise RunFailed(f"GPU check: {', '.join(failed)} failed; see {args.output}")
    print(f"gpu_check: all {len(args.steps)} step(s) passed on {report['gpu']}; results in {args.output}")


if __name__ == "__main__":
    main()
