"""'This flag has no effect': one mechanism (vkd.config.NoEffect rules, refuse_flags_without_effect) for
classification's modules and detection's original flags."""
import argparse

import pytest
from test_vidt import PAPER_FLAGS

import config
from vidt.arguments import NO_EFFECT, check_supported, get_args_parser
from vkd.config import REFUSED, NoEffect, always, option_spellings, refuse_flags_without_effect
from vkd.errors import BadInput

ARGS = argparse.Namespace(opt="sgd", mixup=0.0)
RULES = [
    (lambda a: a.opt != "adamw", {"opt_eps", "opt_betas"}, "they apply to --opt adamw"),  # a module's tuple
    NoEffect(lambda a: a.mixup == 0, lambda: {"mixup_prob"}, "mixup is off"),
    NoEffect(always, {"method"}, "vidt_wo_neck is not supported; use --method vidt", REFUSED),
]


@pytest.mark.parametrize("given, line", [
    ({"opt_eps", "mixup_prob"}, "--mixup-prob has no effect here: mixup is off"),  # the first in sorted order
    ({"opt_betas"}, "--opt-betas has no effect here: they apply to --opt adamw"),
    ({"method"}, "--method vidt_wo_neck is not supported; use --method vidt"),
])
def test_the_first_flag_given_whose_rule_applies_is_one_line(given, line):
    with pytest.raises(BadInput) as refused:
        refuse_flags_without_effect(ARGS, given, RULES)
    assert str(refused.value) == line


def test_flags_whose_rules_do_not_apply_pass():
    refuse_flags_without_effect(argparse.Namespace(opt="adamw", mixup=0.8), {"opt_eps", "mixup_prob", "lr"}, RULES[:2])


def test_a_flag_is_named_as_the_config_file_or_the_parser_spells_it():
    with pytest.raises(BadInput, match=r"^config run.yaml: opt-eps has no effect here"):
        refuse_flags_without_effect(ARGS, {"opt_eps"}, RULES, origins={"opt_eps": "run.yaml"})
    with pytest.raises(BadInput, match=r"^--opt_eps has no effect here"):
        refuse_flags_without_effect(ARGS, {"opt_eps"}, RULES, spellings={"opt_eps": "--opt_eps"})


def test_detection_refuses_a_value_other_than_the_default_named_as_its_parser_spells_it():
    parse = get_args_parser().parse_args
    check_supported(parse(PAPER_FLAGS + ["--lr_backbone", "1e-5", "--dist-backend", "nccl", "--coco_path", "coco"]))
    for flags, line in [(["--lr_backbone", "2e-5"], "--lr_backbone has no effect here: the backbone trains at --lr in "
                                                    "ViDT; leave it at its default"),
                        (["--dr", "0.5"], "--decay-rate has no effect here"),
                        (["--num_feature_levels", "3"], "--num_feature_levels must be 4 (the four Swin levels)")]:
        with pytest.raises(BadInput) as refused:
            check_supported(parse(PAPER_FLAGS + flags + ["--coco_path", "coco"]))
        assert str(refused.value).startswith(line)


def test_every_rule_of_detection_names_one_of_its_flags():
    spellings = option_spellings(get_args_parser())
    assert all(set(rule.names()) <= set(spellings) for rule in NO_EFFECT)


def test_classification_uses_the_same_rules():
    args, explicit = config.parse_arguments(["--opt", "sgd", "--opt-eps", "1e-6"])
    with pytest.raises(BadInput, match="^--opt-eps has no effect here: they apply to --opt adamw$"):
        config.check_arguments(args, explicit)
