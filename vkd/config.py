"""Configuration for the three trees: argparse flags with YAML files of defaults layered under the command
line (timm's way), resolved once. A key in a YAML file is checked as strictly as the flag it names: it must
exist, have the flag's type (a YAML boolean for a switch, an integer for a count, a list of the right
length), be one of the flag's choices, and appear once. ``base: FILE.yaml`` (a string, relative to the file)
supplies defaults that the file overrides, so a family of configs states its shared recipe once. A flag that
cannot take effect with the others given is refused, not ignored: each tree states when as ``NoEffect`` rules,
and ``refuse_flags_without_effect`` applies them."""
import argparse
import os
import reprlib
from typing import Callable, Collection, Dict, Iterable, NamedTuple, Optional, Set, Tuple, Union

import yaml

from vkd.errors import BadInput

NUMBER_TYPES = {int: (int,), float: (int, float)}


class OneLineErrorParser(argparse.ArgumentParser):
    """Parsing errors (an unknown flag, a value of the wrong type) as one ``BadInput`` line, no usage text."""

    def error(self, message: str):
        raise BadInput(f"{message} (--help lists every flag)")


_SHOWN = reprlib.Repr()  # a value in an error message: its beginning, however large the file made it
_SHOWN.maxstring = _SHOWN.maxother = 60
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = 10


def _shown(value) -> str:
    return _SHOWN.repr(value)


def _shown_name(name) -> str:
    """A key or an anchor, without quotes."""
    return _SHOWN.repr(str(name))[1:-1]


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice is an error instead of silently the last value, and
    aliases and merge keys are refused: a few lines of aliases expand to billions of values (a config shares
    values between files with ``base:``)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            alias = self.peek_event()
            raise BadInput(f"YAML aliases are not supported in a config (*{_shown_name(alias.anchor)}, "
                           f"line {alias.start_mark.line + 1}): write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise BadInput(f"YAML merge keys ('<<', line {key_node.start_mark.line + 1}) are not supported in a "
                               "config: 'base: FILE.yaml' supplies defaults from another file")
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise BadInput(f"key {_shown(key)} appears twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str) -> dict:
    try:
        with open(path, "rb") as handle:
            content = yaml.load(handle.read().decode("utf-8"), Loader=_UniqueKeyLoader) or {}
    except BadInput as error:
        raise BadInput(f"config {path}: {error}") from None
    except UnicodeDecodeError as error:
        raise BadInput(f"config {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at position "
                       f"{error.start})") from None
    except (OSError, yaml.YAMLError) as error:
        raise BadInput(f"could not read config {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(content, dict):
        raise BadInput(f"config {path} must be a mapping of flag names to values")
    return content


def _type_name(kind) -> str:
    return {int: "an integer", float: "a number", str: "a string"}.get(kind, f"a {getattr(kind, '__name__', kind)}")


def _scalar(action: argparse.Action, value, where: str):
    """``value`` as the flag's type would give it; strings only where YAML cannot write the type itself."""
    kind = action.type or str
    if kind in NUMBER_TYPES:
        if isinstance(value, bool) or not isinstance(value, NUMBER_TYPES[kind] + (str,)):
            raise BadInput(f"{where}: expected {_type_name(kind)}, got {_shown(value)}")
        if isinstance(value, str) and kind is int:
            raise BadInput(f"{where}: expected an integer, got the string {_shown(value)}")
        try:
            return kind(value)  # YAML reads 5e-4 (no dot) as a string: convert it as the command line would
        except ValueError:
            raise BadInput(f"{where}: expected {_type_name(kind)}, got {_shown(value)}") from None
    if kind is str:
        if not isinstance(value, str):
            raise BadInput(f"{where}: expected a string, got {_shown(value)}")
        return value
    if not isinstance(value, (str, int, float)):  # a custom parser of text
        raise BadInput(f"{where}: expected {action.metavar or 'a value'}, got {_shown(value)}")
    try:
        return kind(str(value))  # a YAML boolean as 'True' / 'False', what detection's boolean flags parse
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise BadInput(f"{where}: {error}") from None


def _is_switch(action: argparse.Action) -> bool:
    return action.nargs == 0 and isinstance(action.const, bool) or isinstance(action, argparse.BooleanOptionalAction)


def typed_value(action: argparse.Action, value, where: str):
    """``value`` from a YAML file, checked against ``action`` (the flag of the same destination)."""
    if value is None:
        if action.default is None:
            return None
        raise BadInput(f"{where}: null is not a value of this flag (default {_shown(action.default)})")
    if _is_switch(action):
        if not isinstance(value, bool):
            raise BadInput(f"{where}: expected true or false, got {_shown(value)}")
        return value
    if action.nargs in (None, "?"):
        if isinstance(value, (list, dict)):
            raise BadInput(f"{where}: expected one value, got {_shown(value)}")
        typed = _scalar(action, value, where)
    else:
        if not isinstance(value, list):
            raise BadInput(f"{where}: expected a list, got {_shown(value)}")
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise BadInput(f"{where}: expected a list of {action.nargs} values, got {len(value)}")
        if action.nargs == "+" and not value:
            raise BadInput(f"{where}: expected a list of at least one value")
        typed = [_scalar(action, item, where) for item in value]
    for item in typed if isinstance(typed, list) else [typed]:
        if action.choices is not None and item not in action.choices:
            raise BadInput(f"{where}: must be one of {', '.join(map(str, action.choices))}, got {_shown(item)}")
    return typed


def _actions_by_destination(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    actions = {}
    for action in parser._actions:
        # A switch pair (--x / --no-x) shares one destination; the first flag defines its type.
        actions.setdefault(action.dest, action)
    return actions


def _read_config(path: str, chain: Tuple[str, ...]) -> Tuple[dict, Optional[str]]:
    """(the keys ``path`` sets itself, the path of its ``base`` or None); ``chain``: the files that led here."""
    if os.path.abspath(path) in chain:
        raise BadInput(f"config {path}: 'base' refers back to itself through {' -> '.join(chain)}")
    config = _read_yaml(path)
    base = config.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise BadInput(f"config {path}: base must be one file name (a string), got {_shown(base)}")
    return config, os.path.join(os.path.dirname(path), base) if base else None


def config_settings(path: str, chain: Tuple[str, ...] = ()) -> dict:
    """What ``path`` sets over its ``base`` chain, keys as written and values unchecked: the file's meaning,
    whatever its comments and layout."""
    config, base = _read_config(path, chain)
    return {**(config_settings(base, chain + (os.path.abspath(path),)) if base else {}), **config}


def config_file_defaults(parser: argparse.ArgumentParser, path: str, chain: Tuple[str, ...] = ()) -> Dict[str, object]:
    """The defaults ``path`` (and its ``base`` chain) sets, by destination, each checked against its flag."""
    config, base = _read_config(path, chain)
    defaults = config_file_defaults(parser, base, chain + (os.path.abspath(path),)) if base else {}
    actions = _actions_by_destination(parser)
    for key, value in config.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions or dest in ("config", "help"):
            raise BadInput(f"config {path}: unknown key '{_shown_name(key)}'")
        defaults[dest] = typed_value(actions[dest], value, f"config {path}: {_shown_name(key)}")
    return defaults


def config_origins(path: Optional[str], explicit: Set[str]) -> Dict[str, str]:
    """The file of ``path``'s base chain that set each destination (the nearest to ``path``), for those not
    given on the command line (``explicit``): what ``flag_name`` names."""
    origins: Dict[str, str] = {}
    chain: Tuple[str, ...] = ()
    while path:
        config, base = _read_config(path, chain)
        for key in config:
            origins.setdefault(str(key).lstrip("-").replace("-", "_"), path)
        chain, path = chain + (os.path.abspath(path),), base
    return {dest: origin for dest, origin in origins.items() if dest not in explicit}


def flag_name(dest: str, origins: Dict[str, str], spellings: Optional[Dict[str, str]] = None) -> str:
    """An argument as an error names it: 'config FILE: batch-size' where a config file set its value (see
    ``config_origins``), else its flag: as ``spellings`` (``option_spellings``) has it, or '--batch-size'."""
    spelled = dest.replace("_", "-")
    if dest in origins:
        return f"config {origins[dest]}: {spelled}"
    return (spellings or {}).get(dest, f"--{spelled}")


def option_spellings(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """Each destination's flag as the parser spells it first (``--lr_backbone``, ``--decay-rate``)."""
    spellings: Dict[str, str] = {}
    for action in parser._actions:
        if action.option_strings:
            spellings.setdefault(action.dest, action.option_strings[0])
    return spellings


def always(args: argparse.Namespace) -> bool:
    return True


REFUSED = "{flag} {reason}"  # the line of a rule whose reason says it all ('--iou_aware' 'is not supported')


class NoEffect(NamedTuple):
    """A rule: while ``applies(args)``, a flag of ``flags`` (destinations, or a function returning them) that was
    given cannot take effect here, because ``reason``. ``line`` is the refusal, with the flag and the reason."""
    applies: Callable[[argparse.Namespace], bool]
    flags: Union[Collection[str], Callable[[], Collection[str]]]
    reason: str
    line: str = "{flag} has no effect here: {reason}"

    def names(self) -> Collection[str]:
        return self.flags() if callable(self.flags) else self.flags


def refuse_flags_without_effect(args: argparse.Namespace, given: Iterable[str], rules: Iterable[NoEffect],
                                origins: Optional[Dict[str, str]] = None,
                                spellings: Optional[Dict[str, str]] = None) -> None:
    """The first destination of ``given`` (what was set on purpose) that a rule refuses is one ``BadInput`` line,
    naming it as the config file (``origins``, from ``config_origins``) or the command line (``spellings``) has it;
    the rules are tried in their order."""
    rules = [NoEffect(*rule) for rule in rules]
    for dest in sorted(given):
        for rule in rules:
            if dest in rule.names() and rule.applies(args):
                raise BadInput(rule.line.format(flag=flag_name(dest, origins or {}, spellings), reason=rule.reason))


def _parse_with_defaults(parser: argparse.ArgumentParser, argv, defaults: Dict[str, object]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with ``defaults`` (by destination) in place of the parser's own, which are put
    back after: each flag's own default (the two flags of a switch pair, --x / --no-x, have different ones, and
    argparse takes the first) and those of ``set_defaults``."""
    flag_defaults = [(action, action.default) for action in parser._actions]
    parser_defaults = dict(parser._defaults)
    parser.set_defaults(**defaults)
    try:
        return parser.parse_args(argv)
    finally:
        for action, default in flag_defaults:
            action.default = default
        parser._defaults.clear()  # shared with the argument groups: restored in place
        parser._defaults.update(parser_defaults)


def explicit_destinations(parser: argparse.ArgumentParser, argv) -> Set[str]:
    """Destinations given on the command line (not defaults): parse again with a marker as every default."""
    not_given = object()  # not a string, so argparse never type-converts it
    destinations = {action.dest for action in parser._actions} | set(parser._defaults)
    parsed = _parse_with_defaults(parser, argv, dict.fromkeys(destinations, not_given))
    return {dest for dest, value in vars(parsed).items() if value is not not_given}


def parse_with_config(parser: argparse.ArgumentParser, argv) -> Tuple[argparse.Namespace, Set[str], Set[str]]:
    """(arguments, destinations given on the command line, destinations the ``--config`` file sets itself).

    The keys a file takes from its ``base`` are not in the third set: a base is the shared recipe of a family
    of configs (the rows of an ablation), where a key may matter to some members only. ``parser`` is left as
    it was."""
    argv = list(argv)
    explicit = explicit_destinations(parser, argv)
    args = parser.parse_args(argv)
    from_file: Set[str] = set()
    if getattr(args, "config", None):
        file_defaults = config_file_defaults(parser, args.config)
        from_file = {str(key).lstrip("-").replace("-", "_") for key in _read_yaml(args.config)} - {"base"}
        args = _parse_with_defaults(parser, argv, file_defaults)
    return args, explicit, from_file
