"""vkd.config at its edges: defaults exactly argparse's own (switch pairs, set_defaults) in the three trees,
YAML that could blow up or mislead (aliases, merge keys, bytes that are not UTF-8) refused in one bounded line,
and a bad value from a config file reported as that file's key."""
import argparse
import re

import pytest

import config
import generation.arguments
import generation.main
import vidt.arguments
from vkd.config import OneLineErrorParser, parse_with_config
from vkd.errors import BadInput

TREE_PARSERS = {"classification": config.build_parser, "detection": vidt.arguments.get_args_parser,
                "generation": generation.arguments.build_parser}


@pytest.mark.parametrize("tree", sorted(TREE_PARSERS))
def test_without_flags_every_value_is_argparse_s_own_default(tree):
    expected = vars(TREE_PARSERS[tree]().parse_args([]))
    args, explicit, from_file = parse_with_config(TREE_PARSERS[tree](), [])
    assert vars(args) == expected
    assert explicit == set() and from_file == set()


def switch_pair_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser("test")
    parser.add_argument("--config")
    parser.add_argument("--ema", action="store_true", default=False)
    parser.add_argument("--no-ema", action="store_false", dest="ema")
    parser.add_argument("--pin", action="store_true")
    parser.add_argument("--no-pin", action="store_false", dest="pin")
    parser.set_defaults(pin=True, handler="train")  # a destination no flag has
    return parser


def test_a_switch_pair_keeps_its_first_flag_s_default_and_set_defaults_count_as_defaults(tmp_path):
    parser = switch_pair_parser()
    args, explicit, _ = parse_with_config(parser, [])
    assert (args.ema, args.pin, args.handler) == (False, True, "train") and explicit == set()
    args, explicit, _ = parse_with_config(parser, ["--no-pin", "--ema"])
    assert (args.ema, args.pin) == (True, False) and explicit == {"ema", "pin"}
    (tmp_path / "run.yaml").write_text("ema: true\npin: false\n")
    args, explicit, from_file = parse_with_config(parser, ["--config", str(tmp_path / "run.yaml")])
    assert (args.ema, args.pin) == (True, False) and explicit == {"config"} and from_file == {"ema", "pin"}
    # The parser is left as it was: the file's values do not leak into the next parse.
    assert vars(parser.parse_args([])) == {"config": None, "ema": False, "pin": True, "handler": "train"}


def small_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser("test")
    parser.add_argument("--config")
    parser.add_argument("--lr", type=float, default=1e-3)
    return parser


def config_error(tmp_path, content) -> str:
    path = tmp_path / "run.yaml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(BadInput) as error:
        parse_with_config(small_parser(), ["--config", str(path)])
    return str(error.value)


# Each level repeats the one before ten times: 10^5 values from a few lines, 10^9 from a few more.
ALIAS_BOMB = "lr:\n  - &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"  - &{level} [{', '.join([f'*{previous}'] * 10)}]\n" for previous, level in zip("abcd", "bcde"))


@pytest.mark.parametrize("content, message", [
    (ALIAS_BOMB, r"YAML aliases are not supported in a config \(\*a, line 3\): write the value out"),
    ("lr: " + "9" * 100_000 + "x\n", r"lr: expected a number, got '9{20}.*'$"),
    ("? " + "l" * 100_000 + "\n: 1\n", r"unknown key 'l{20}.*'$"),
    ("lr: [" + "1, " * 100_000 + "1]\n", r"lr: expected one value, got \[1, 1, .*\]$"),
])
def test_a_config_error_is_one_bounded_line_however_large_the_file_makes_the_value(tmp_path, content, message):
    error = config_error(tmp_path, content)
    assert len(error) < 300 + len(str(tmp_path)) and "\n" not in error
    assert error.startswith(f"config {tmp_path / 'run.yaml'}: ") and re.search(message, error)


def test_a_yaml_merge_key_is_refused_in_one_line(tmp_path):
    assert config_error(tmp_path, "<<: {lr: 0.1}\n") == (
        f"config {tmp_path / 'run.yaml'}: YAML merge keys ('<<', line 1) are not supported in a config: "
        "'base: FILE.yaml' supplies defaults from another file")


def test_a_config_that_is_not_utf8_is_one_line_in_classification_and_generation(tmp_path, run_main,
                                                                                  run_entry_point):
    path = tmp_path / "run.yaml"
    path.write_bytes("lr: 0.1  # é\n".encode("latin-1"))
    expected = f"error: config {path} is not UTF-8 text (byte 0xe9 at position 11)\n"
    assert run_main(["--config", path]) == (2, "", expected)
    assert run_entry_point(generation.main, ["--config", path]) == (2, "", expected)


def test_a_bad_value_from_a_config_file_is_named_as_its_key(tmp_path, run_entry_point):
    path = tmp_path / "run.yaml"
    path.write_text("batch-size: 0\n")
    code, _, err = run_entry_point(generation.main, ["--config", path])
    assert (code, err) == (2, f"error: config {path}: batch-size must be at least 1, got 0\n")
    code, _, err = run_entry_point(generation.main, ["--config", path, "--batch-size", "-1"])
    assert (code, err) == (2, "error: --batch-size must be at least 1, got -1\n")
