"""--compile: the frozen teacher's forward under torch.compile gives the plain forward's numbers (within
float tolerance) and reports its compile time once."""
import pytest
import timm
import torch
import torch.nn as nn
from conftest import CLASSES, IMAGE_SIZE, TEACHER

from distillers import method_args
from distillers.vkd import VkD
from vkd.losses import features_and_logits


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_the_compiled_teacher_matches_the_plain_one_and_reports_its_compile_time_once(backend):
    torch.manual_seed(0)
    teacher = timm.create_model(TEACHER, num_classes=len(CLASSES)).eval()
    lines = []
    criterion = VkD(method_args(), teacher, nn.CrossEntropyLoss(), compile_backend=backend, log=lines.append)
    for seed in (1, 2):
        images = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            compiled, plain = criterion.teacher_outputs(images), features_and_logits(teacher, images)
        for actual, expected in zip(compiled, plain):
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    [line] = lines
    assert line.startswith(f"Teacher compiled with torch.compile (backend {backend}) in ") and line.endswith(" s")


def test_a_compiled_run_prints_the_compile_time_once(run_main, train_flags, tmp_path):
    code, out, err = run_main(train_flags + ["--epochs", 1, "--output_dir", tmp_path / "run", "--compile", "aot_eager"])
    assert code == 0, err[-3000:]
    assert out.count("Teacher compiled with torch.compile (backend aot_eager) in ") == 1


@pytest.mark.parametrize("flags, message", [
    (["--compile", "no_such_backend"], "--compile: unknown backend 'no_such_backend'; e.g. "),
    (["--compile", "--alpha", 0, "--gamma", 0], "--compile has no effect here"),
])
def test_bad_compile_flags_are_refused(flags, message, run_main, train_flags, tmp_path):
    code, _, err = run_main(train_flags + ["--output_dir", tmp_path / "run", *flags])
    assert code == 2 and message in err
