"""Distillation methods for classification, one module each, registered in ``DISTILLERS`` (``--distiller``).

Adding a method: a ``distillers.base.Distiller`` subclass in a new module here and one entry below. Its flags
are added to the command line, refused with another ``--distiller``, logged, and made run-defining for resume
by the code here; the training loop, the checkpoints and the resume rules stay as they are.
"""
import argparse
from typing import Dict, List, Set, Type

from distillers.base import Distiller, Flag, StudentOutputs
from distillers.deit import DeiTHard, DeiTSoft
from distillers.fitnet import FitNet
from distillers.kd import KD
from distillers.none import NoDistillation
from distillers.vkd import VkD

__all__ = ["DISTILLERS", "DEFAULT_DISTILLER", "Distiller", "Flag", "StudentOutputs", "add_arguments",
           "all_flags", "distiller_class", "method_args", "owners_of", "run_defining_flags"]

DEFAULT_DISTILLER = "vkd"
DISTILLERS: Dict[str, Type[Distiller]] = {
    cls.name: cls for cls in (VkD, KD, DeiTHard, DeiTSoft, FitNet, NoDistillation)}


def distiller_class(name: str) -> Type[Distiller]:
    if name not in DISTILLERS:
        raise ValueError(f"unknown distiller '{name}'; choose from {', '.join(DISTILLERS)}")
    return DISTILLERS[name]


def all_flags() -> List[Flag]:
    """Every distiller's flags, each once, in registry order."""
    found: Dict[str, Flag] = {}
    for cls in DISTILLERS.values():
        for flag in cls.flags:
            if found.setdefault(flag.dest, flag) is not flag:
                raise TypeError(f"{cls.__name__} declares its own {flag.name}; share the one flag by importing it")
    return list(found.values())


def run_defining_flags() -> List[str]:
    """``--distiller`` and the distillers' flags that a resume may not change, as spelled on the command line."""
    return ["--distiller"] + [flag.name for flag in all_flags() if flag.defines_run]


def method_args(**values) -> argparse.Namespace:
    """Every distiller flag at its default, with ``values``: the arguments a distiller reads, for code that
    builds one outside the command line (tests, benchmarks, your own loop)."""
    unknown = set(values) - {flag.dest for flag in all_flags()}
    if unknown:
        raise TypeError(f"not a distiller flag: {', '.join(sorted(unknown))}")
    return argparse.Namespace(**{**{flag.dest: flag.default for flag in all_flags()}, **values})


def owners_of(dest: str) -> List[str]:
    """The distillers that read the flag of destination ``dest``."""
    return [name for name, cls in DISTILLERS.items() if dest in cls.flag_dests()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--distiller`` and each distiller's flags, in one group per distiller (shared flags in the first)."""
    listing = "; ".join(f"{name}: {cls.summary}" for name, cls in DISTILLERS.items())
    parser.add_argument("--distiller", default=DEFAULT_DISTILLER, choices=tuple(DISTILLERS),
                        help=f"the distillation method (default: {DEFAULT_DISTILLER}). {listing}")
    added: Set[str] = set()
    for name, cls in DISTILLERS.items():
        shared = [flag.name for flag in cls.flags if flag.dest in added]
        description = cls.source + (f"; also reads {', '.join(shared)}" if shared else "")
        group = parser.add_argument_group(f"--distiller {name}", description)
        for flag in cls.flags:
            if flag.dest not in added:
                flag.add_to(group)
                added.add(flag.dest)
