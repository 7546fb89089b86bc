"""A strict argument parser shared by the scripts: an unknown option is an error that lists the valid ones.

argparse alone says "unrecognized arguments: --rnak" and stops; a learner then has to go and find the
right spelling. This parser also prints the options it knows and the closest match.
"""

import argparse
import difflib


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
