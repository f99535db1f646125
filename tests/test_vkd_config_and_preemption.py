"""vkd.config (YAML layered under the flags, each key checked like its flag) and vkd.preemption (the stop
request, random generators saved and restored)."""
import argparse
import os
import random
import signal

import numpy as np
import pytest
import torch

from vkd.config import OneLineErrorParser, config_settings, parse_with_config
from vkd.errors import BadInput
from vkd.preemption import StopRequest, rng_states, set_rng_states


def parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser("test")
    parser.add_argument("--config")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", action="store_true")
    parser.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999])
    parser.add_argument("--mode", choices=("a", "b"), default="a")
    return parser


def test_yaml_sets_defaults_the_command_line_overrides_and_the_file_s_own_keys_are_reported(tmp_path):
    (tmp_path / "base.yaml").write_text("epochs: 5\nmode: b\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\nlr: 5e-4\nema: true\nbetas: [0.8, 0.9]\n")
    args, explicit, from_file = parse_with_config(parser(), ["--config", str(tmp_path / "run.yaml"), "--epochs", "7"])
    assert (args.epochs, args.lr, args.ema, args.betas, args.mode) == (7, 5e-4, True, [0.8, 0.9], "b")
    assert explicit == {"config", "epochs"} and from_file == {"lr", "ema", "betas"}


def test_config_settings_are_a_file_over_its_base_chain_whatever_its_comments(tmp_path):
    (tmp_path / "common.yaml").write_text("epochs: 5\nmode: b\n")
    (tmp_path / "family.yaml").write_text("base: common.yaml\nmode: a\nlr: 1.0e-3\n")
    (tmp_path / "row.yaml").write_text("# a title\nbase: family.yaml\nlr: 2.0e-3  # faster\n")
    assert config_settings(str(tmp_path / "row.yaml")) == {"epochs": 5, "mode": "a", "lr": 2e-3}
    (tmp_path / "common.yaml").write_text("base: row.yaml\n")
    with pytest.raises(BadInput, match="refers back to itself"):
        config_settings(str(tmp_path / "row.yaml"))


@pytest.mark.parametrize("text, message", [
    ("epochs: 2.5", "epochs: expected an integer"), ("lr: yes", "lr: expected a number"),
    ("ema: 1", "ema: expected true or false"), ("betas: [0.9]", "a list of 2 values"),
    ("mode: c", "must be one of a, b"), ("speed: 3", "unknown key 'speed'"), ("lr: 1\nlr: 2", "appears twice"),
    ("base: 3", "base must be one file name"), ("- a list", "must be a mapping"),
])
def test_a_bad_yaml_key_is_one_error_naming_the_file(tmp_path, text, message):
    (tmp_path / "run.yaml").write_text(text + "\n")
    with pytest.raises(BadInput, match=message) as error:
        parse_with_config(parser(), ["--config", str(tmp_path / "run.yaml")])
    assert str(tmp_path / "run.yaml") in str(error.value)


def test_a_bad_flag_is_one_line_without_the_usage():
    with pytest.raises(BadInput, match=r"argument --epochs: invalid int value: 'many' \(--help lists every flag\)"):
        parse_with_config(parser(), ["--epochs", "many"])


def test_a_stop_signal_is_noted_not_obeyed_while_the_request_is_active():
    previous = signal.getsignal(signal.SIGUSR1)
    with StopRequest() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested() and stop.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_random_generators_are_restored_exactly():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    saved = rng_states()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_states(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
