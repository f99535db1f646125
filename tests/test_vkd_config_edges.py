"""vkd.config at its edges: defaults exactly argparse's own (switch pairs, set_defaults) in the three trees,
YAML that could blow up or mislead (aliases, merge keys, bytes that are not UTF-8) refused in one bounded line,
and a bad value from a config file reported as that file's key."""
import argparse

import pytest

import config
import generation.main
import vidt.arguments
from vkd.config import OneLineErrorParser, parse_with_config

TREE_PARSERS = {"classification": config.build_parser, "detection": vidt.arguments.get_args_parser,
                "generation": generation.main.build_parser}


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
