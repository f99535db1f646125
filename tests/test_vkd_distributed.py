"""vkd.distributed: which launcher started the process, and decisions that only the main process takes."""
import contextlib

import pytest
import torch

from vkd import distributed
from vkd.errors import BadInput, RunFailed

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                      "SLURM_JOB_NODELIST", "SLURM_NODELIST", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.setenv(name, "")  # recorded, so what launcher_ranks exports is undone after the test
        monkeypatch.delenv(name)


def test_a_plain_run_is_rank_0_of_1_with_the_local_rank_flag():
    assert distributed.launcher_ranks(3) == (0, 1, 3)


def test_torchrun_variables_win_over_the_local_rank_flag(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launcher_ranks(0) == (5, 8, 1)


def test_slurm_tasks_export_what_env_process_groups_read(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("MASTER_ADDR", "node-a")
    assert distributed.launcher_ranks() == (3, 4, 1)
    assert [distributed.os.environ[name] for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")] == [
        "3", "4", "1", distributed.DEFAULT_MASTER_PORT]


def test_slurm_without_a_findable_first_node_is_bad_input(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    with pytest.raises(BadInput, match="export MASTER_ADDR"):
        distributed.launcher_ranks()


def test_a_world_size_flag_must_agree_with_the_launcher():
    with pytest.raises(BadInput, match="--world_size 2 but the launcher started 1"):
        distributed.start_processes("cpu", world_size_flag=2)
    runtime = distributed.start_processes("cpu")
    assert (runtime.rank, runtime.world_size, runtime.device, runtime.is_main) == (0, 1, torch.device("cpu"), True)


def test_cuda_without_a_gpu_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(BadInput, match="no CUDA device is visible; pass --device cpu"):
        distributed.select_device("cuda", 0)


def test_the_main_process_decides_alone():
    assert distributed.main_process_decides(lambda: 42, is_main=True) == 42
    with pytest.raises(BadInput, match="refused"):
        distributed.main_process_decides(lambda: (_ for _ in ()).throw(BadInput("refused")), is_main=True)


def test_alone_a_mean_over_ranks_is_the_values_themselves():
    values = torch.tensor([1.5, -2.0])
    assert distributed.mean_over_ranks(values) is values and values.tolist() == [1.5, -2.0]
    assert distributed.is_main_process()


def test_a_mean_over_ranks_is_one_sum_divided_by_the_process_count(monkeypatch):
    calls = []

    def all_reduce(tensor, op=distributed.dist.ReduceOp.SUM):  # three ranks holding the same values
        calls.append(op)
        tensor.mul_(3)

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 2)
    values = torch.tensor([3.0, 6.0])
    assert distributed.mean_over_ranks(values).tolist() == [3.0, 6.0] and calls == [distributed.dist.ReduceOp.SUM]
    assert not distributed.is_main_process()


GLOO_PEER_GONE = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242"


@pytest.fixture
def one_process_group(tmp_path):
    distributed.dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if distributed.dist.is_initialized():
        distributed.dist.destroy_process_group()


def test_a_failed_collective_is_one_line_naming_the_rank_and_the_timeout_and_the_group_ends(one_process_group):
    with pytest.raises(RunFailed) as failure:
        with distributed.ending_the_process_group(0.5):
            raise RuntimeError(GLOO_PEER_GONE + "\nmore detail")
    assert str(failure.value) == ("rank 0: distributed communication failed, probably because another process died "
                                  "or hung (collectives give up after --dist-timeout 0.5 min): " + GLOO_PEER_GONE)
    assert not distributed.dist.is_initialized()


@pytest.mark.parametrize("error", [ValueError("a bad value"), RuntimeError("CUDA out of memory"), None])
def test_other_endings_pass_through_and_the_group_ends_too(one_process_group, error):
    with pytest.raises(type(error)) if error else contextlib.nullcontext():
        with distributed.ending_the_process_group(30):
            if error:
                raise error
    assert not distributed.dist.is_initialized()


def test_without_a_process_group_a_transport_error_is_left_as_it_is():
    with pytest.raises(RuntimeError, match="Connection closed by peer") as failure:
        with distributed.ending_the_process_group(30):
            raise RuntimeError(GLOO_PEER_GONE)
    assert not isinstance(failure.value, RunFailed)
