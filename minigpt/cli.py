"""A strict argument parser shared by the scripts: an unknown option is an error that lists the valid ones.

argparse alone says "unrecognized arguments: --rnak" and stops; a learner then has to go and find the
right spelling. This parser also prints the options it knows and the closest match.
"""

import argparse
import dataclasses
import difflib
import typing


class StrictArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose unknown-option error names the valid options and the closest one."""

    def valid_options(self) -> list[str]:
        return sorted(s for action in self._actions for s in action.option_strings if s.startswith("--"))

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            valid = self.valid_options()
            hints = []
            for arg in unknown:
                close = difflib.get_close_matches(arg.split("=")[0], valid, n=1)
                hints.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
            self.error(f"unknown option(s): {', '.join(hints)}\nvalid options: {' '.join(valid)}")
        return parsed


def parse_config(config_class, argv=None, description: str = ""):
    """Build a frozen-dataclass config from the command line: one --option per field.

    `steps: int = 1200` becomes `--steps STEPS`; a bool field `plot: bool = True` becomes
    `--plot / --no-plot`. The field comments in the dataclass are the documentation.
    """
    defaults = config_class()
    parser = StrictArgumentParser(description=description)
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=_value_type(field), default=default, metavar=field.name.upper())
    return config_class(**vars(parser.parse_args(argv)))


def _value_type(field) -> type:
    """int, float or str from a field's annotation; `int | None` gives int."""
    annotation = field.type
    candidates = [t for t in typing.get_args(annotation) if t is not type(None)] or [annotation]
    kind = candidates[0]
    return kind if kind in (int, float) else str
