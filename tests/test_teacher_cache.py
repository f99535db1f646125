"""--teacher-cache: the teacher's outputs per input batch, stored once and read back bit for bit by the runs
that feed it the same batches; the batches of a seed do not depend on the student."""
import errno
import glob
import json
import multiprocessing
import os
import tempfile

import pytest
import timm
import torch
from conftest import CLASSES, IMAGE_SIZE, TEACHER

from distillers.teacher_cache import TeacherCache
from vkd.checkpoints import safe_torch_load
from vkd.errors import BadInput
from vkd.losses import features_and_logits

STEPS = 4  # 18 training images in batches of 4, the last partial one dropped
IDENTITY = dict(architecture=TEACHER, input_size=IMAGE_SIZE, channels_last=True, amp="none")


@pytest.fixture
def cached_run(run_main, train_flags, tmp_path):
    """``cached_run(name, *extra)``: a one-epoch run with mixup on; returns its log.txt record and stdout."""
    def run(name, *extra):
        output_dir = tmp_path / name
        code, out, err = run_main(train_flags + ["--epochs", 1, "--output_dir", output_dir, *extra])
        assert code == 0, err[-3000:]
        with open(output_dir / "log.txt") as handle:
            return json.loads(handle.read().splitlines()[-1]), out
    return run


def student_weights(folder):
    return safe_torch_load(str(folder / "latest.pth.tar"))["student"]


def entries(folder):
    return sorted(glob.glob(os.path.join(str(folder), "*", "*.pt")))


def test_a_second_run_reads_every_batch_and_both_end_bit_identical_to_no_cache(cached_run, tmp_path):
    cache = tmp_path / "cache"
    plain, _ = cached_run("plain")
    assert "train_teacher_cache_hits" not in plain
    first, out = cached_run("first", "--teacher-cache", cache)
    assert (first["train_teacher_cache_hits"], first["train_teacher_cache_misses"]) == (0, STEPS)
    assert len(entries(cache)) == STEPS
    assert first["train_teacher_cache_bytes_written"] == sum(os.path.getsize(path) for path in entries(cache))
    assert f"Teacher cache {cache}: 0 hits, {STEPS} misses (0.0% hit rate)" in out
    second, out = cached_run("second", "--teacher-cache", cache)
    assert (second["train_teacher_cache_hits"], second["train_teacher_cache_misses"]) == (STEPS, 0)
    assert second["train_teacher_cache_bytes_written"] == 0
    assert f"{STEPS} hits, 0 misses (100.0% hit rate), 0.0 MiB written" in out
    expected = student_weights(tmp_path / "plain")
    for name in ("first", "second"):
        actual = student_weights(tmp_path / name)
        assert all(torch.equal(actual[key], value) for key, value in expected.items())
    assert second["train_loss"] == first["train_loss"] == plain["train_loss"]


def test_the_batches_do_not_depend_on_the_student_nor_its_drop_path(cached_run, tmp_path):
    # Without workers, augmentation and mixup draw in this process: a student's drop-path must not shift them.
    cache = tmp_path / "cache"
    cached_run("tiny", "--teacher-cache", cache)
    other, _ = cached_run("small", "--teacher-cache", cache, "--student-model", "deit_s_distilled",
                          "--drop-path", "0.2", "--drop", "0.1")
    assert (other["train_teacher_cache_hits"], other["train_teacher_cache_misses"]) == (STEPS, 0)


def test_without_a_teacher_the_flag_is_refused(run_main, train_flags, tmp_path):
    code, _, err = run_main(train_flags + ["--alpha", 0, "--gamma", 0, "--teacher-cache", tmp_path / "cache"])
    assert code == 2 and "--teacher-cache has no effect here" in err


def tiny_teacher(seed=0):
    torch.manual_seed(seed)
    return timm.create_model(TEACHER, num_classes=len(CLASSES)).eval()


def batches(count=3):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) for _ in range(count)]


def look_up(cache, teacher, samples):
    with torch.no_grad():
        return cache.outputs(samples, lambda images: features_and_logits(teacher, images))


def test_a_truncated_entry_is_recomputed_rewritten_and_counted_as_a_miss(tmp_path):
    teacher, [samples] = tiny_teacher(), batches(1)
    expected = look_up(TeacherCache(str(tmp_path), teacher, IDENTITY), teacher, samples)
    [path] = entries(tmp_path)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    cache = TeacherCache(str(tmp_path), teacher, IDENTITY)
    for _ in range(2):
        outputs = look_up(cache, teacher, samples)
        assert all(torch.equal(actual, wanted) for actual, wanted in zip(outputs, expected))
    assert cache.take_counts()[:2] == (1, 1)
    assert torch.equal(safe_torch_load(path)["logits"], expected[1])


def test_other_weights_or_another_input_size_never_hit_an_old_entry(tmp_path):
    teacher, samples = tiny_teacher(), batches()
    for sample in samples:
        look_up(TeacherCache(str(tmp_path), teacher, IDENTITY), teacher, sample)
    for other, identity in ((tiny_teacher(seed=1), IDENTITY), (teacher, dict(IDENTITY, input_size=64))):
        cache = TeacherCache(str(tmp_path), other, identity)
        for sample in samples:
            look_up(cache, other, sample)
        assert cache.take_counts()[:2] == (0, len(samples))
    assert len(entries(tmp_path)) == 3 * len(samples)


def test_another_thread_count_never_hits_an_old_entry(tmp_path):
    teacher, samples = tiny_teacher(), batches()
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            cache = TeacherCache(str(tmp_path), teacher, IDENTITY)
            for sample in samples:
                look_up(cache, teacher, sample)
            assert cache.take_counts()[:2] == (0, len(samples))
    finally:
        torch.set_num_threads(threads)


def write_entries(folder, start):
    torch.set_num_threads(1)
    teacher = tiny_teacher()
    start.wait()  # both processes write the same keys at the same time
    cache = TeacherCache(folder, teacher, IDENTITY)
    for samples in batches(8):
        look_up(cache, teacher, samples)


@pytest.mark.slow
def test_two_processes_writing_the_same_entries_leave_them_valid(tmp_path):
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    writers = [context.Process(target=write_entries, args=(str(tmp_path), start)) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [writer.exitcode for writer in writers] == [0, 0]
    torch.set_num_threads(1)  # the writers' thread count, for bit-equal outputs
    teacher = tiny_teacher()
    cache = TeacherCache(str(tmp_path), teacher, IDENTITY)
    for samples in batches(8):
        expected = features_and_logits(teacher, samples)
        entry = safe_torch_load(cache.path(samples))
        assert torch.equal(entry["features"], expected[0]) and torch.equal(entry["logits"], expected[1])
    assert len(entries(tmp_path)) == 8 and not glob.glob(os.path.join(str(tmp_path), "*", ".*"))


def test_an_entry_with_a_flipped_byte_in_its_tensors_is_recomputed_and_rewritten(tmp_path):
    teacher, [samples] = tiny_teacher(), batches(1)
    expected = look_up(TeacherCache(str(tmp_path), teacher, IDENTITY), teacher, samples)
    [path] = entries(tmp_path)
    content = bytearray(open(path, "rb").read())
    logits = expected[1].contiguous().numpy().tobytes()
    assert content.count(logits) == 1  # torch stores tensors uncompressed
    content[content.index(logits) + len(logits) // 2] ^= 0x01
    with open(path, "wb") as handle:
        handle.write(content)
    assert not torch.equal(torch.load(path, weights_only=True)["logits"], expected[1])
    cache = TeacherCache(str(tmp_path), teacher, IDENTITY)
    for _ in range(2):
        outputs = look_up(cache, teacher, samples)
        assert all(torch.equal(actual, wanted) for actual, wanted in zip(outputs, expected))
    assert cache.take_counts()[:2] == (1, 1)
    assert torch.equal(safe_torch_load(path)["logits"], expected[1])


def test_a_cache_that_is_a_file_is_one_line_before_args_json_and_a_retry_is_not_refused(run_main, train_flags,
                                                                                        tmp_path):
    in_the_way, output_dir = tmp_path / "cache", tmp_path / "run"
    in_the_way.write_text("not a folder")
    code, _, err = run_main(train_flags + ["--epochs", 1, "--teacher-cache", in_the_way, "--output_dir", output_dir])
    assert code == 2 and err == f"error: --teacher-cache {in_the_way} is a file, not a folder: choose another folder\n"
    assert not (output_dir / "args.json").exists()
    code, _, err = run_main(train_flags + ["--epochs", 1, "--teacher-cache", tmp_path / "good", "--output_dir",
                                           output_dir])
    assert code == 0, err[-2000:]


def test_a_read_only_cache_folder_is_refused_on_construction(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(BadInput, match=rf"^--teacher-cache {tmp_path} cannot be written \(Read-only file system\)"):
        TeacherCache(str(tmp_path), tiny_teacher(), IDENTITY)


def test_a_full_disk_while_writing_an_entry_warns_once_and_the_run_goes_on(run_main, train_flags, tmp_path,
                                                                          monkeypatch):
    cache, output_dir = tmp_path / "cache", tmp_path / "run"
    saving = torch.save

    def disk_full_in_the_cache(obj, handle, *args, **kwargs):
        if str(getattr(handle, "name", handle)).startswith(str(cache)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return saving(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_in_the_cache)
    with pytest.warns(UserWarning) as warned:
        code, _, err = run_main(train_flags + ["--epochs", 1, "--teacher-cache", cache, "--output_dir", output_dir])
    assert code == 0, err[-2000:]
    messages = [str(warning.message) for warning in warned if "teacher cache" in str(warning.message)]
    assert messages == [f"teacher cache {cache}: an entry could not be written (no space left); this run goes on "
                        "without storing entries (drop --teacher-cache, or free space, for the next runs)"]
    record = json.loads((output_dir / "log.txt").read_text().splitlines()[-1])
    assert (record["train_teacher_cache_misses"], record["train_teacher_cache_bytes_written"]) == (STEPS, 0)
    assert entries(cache) == [] and safe_torch_load(str(output_dir / "latest.pth.tar"))["epoch"] == 0
