"""A strict argument parser shared by the scripts: an unknown option is an error that lists the valid ones.

argparse alone says "unrecognized arguments: --rnak" and stops; a learner then has to go and find the
right spelling. This parser also prints the options it knows and the closest match. Options are
spelled in full: argparse's prefix matching (`--step 5` taken as `--steps 5`) is turned off.

    $ python train.py --stepz 5
    train.py: error: unknown option(s): --stepz (did you mean --steps?)
    valid options: --batch-size --bpe-vocab-size ...
"""

import argparse
import dataclasses
import difflib
import inspect
import math
import os
import re
import signal
import sys
import typing

from runtime.atomic import folder_identity
from runtime.distributed import RendezvousError, failure_elsewhere, is_main_process_from_env, report_failure


class StrictArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose unknown-option error names the valid options and the closest one."""

    def valid_options(self) -> list[str]:
        return sorted(s for action in self._actions for s in action.option_strings if s.startswith("--"))

    def __init__(self, *args, **kwargs):
        # subtle: by default argparse accepts any unambiguous prefix, so `--step 5` silently meant
        # `--steps 5`; here an option is spelled in full, or it is an unknown option
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            valid = self.valid_options()
            # `--stepz 5` leaves ["--stepz", "5"]: name the option only, not the value that followed it
            flags = [arg.split("=")[0] for arg in unknown if arg.startswith("-") and not _is_number(arg)]
            if not flags:
                self.error(f"unexpected argument(s): {' '.join(unknown)} (every option is --name VALUE)\n"
                           f"valid options: {' '.join(valid)}")
            hints = []
            for flag in flags:
                close = difflib.get_close_matches(flag, valid, n=1)
                hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
            self.error(f"unknown option(s): {', '.join(hints)}\nvalid options: {' '.join(valid)}")
        return parsed


def _is_number(text: str) -> bool:
    """True for "-1", "-0.5", "1e-3": a negative value after an unknown option, not an option itself."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_config(config_class, argv=None, description: str = ""):
    """Build a frozen-dataclass config from the command line: one --option per field.

    `steps: int = 1200` becomes `--steps STEPS`; a bool field `plot: bool = True` becomes
    `--plot / --no-plot`. The field comments in the dataclass are the documentation.

    Example:
        >>> @dataclasses.dataclass(frozen=True)
        ... class Demo:
        ...     steps: int = 10  # optimizer steps
        ...     plot: bool = True  # write a PNG
        >>> parse_config(Demo, ["--steps", "3", "--no-plot"])
        Demo(steps=3, plot=False)
    """
    defaults = config_class()
    comments = field_comments(config_class)
    parser = StrictArgumentParser(description=description)
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        # subtle: argparse formats help with %, so a literal % in a comment must be doubled
        help_text = comments.get(field.name, "").replace("%", "%%") + " (default: %(default)s)"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text.strip())
        else:
            parser.add_argument(flag, type=_value_type(field), default=default, metavar=field.name.upper(),
                                help=help_text.strip())
    return config_class(**vars(parser.parse_args(argv)))


def field_comments(config_class) -> dict:
    """{field name: its trailing comment} from the dataclass's source: what `--help` prints per option.

    Example (the class must live in a file; one typed at a prompt has no source to read):
        >>> from runtime.distributed import DistributedContext   # world_size: int = 1  # processes in all; ...
        >>> field_comments(DistributedContext)["world_size"]
        'processes in all; 1 means a plain single-process run, nothing distributed'
    """
    try:
        source = inspect.getsource(config_class)
    except (OSError, TypeError):  # defined where there is no source file (an interactive session)
        return {}
    names = {field.name for field in dataclasses.fields(config_class)}
    comments = {}
    for line in source.splitlines():
        match = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        if match and match.group(1) in names and match.group(1) not in comments:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def stop_like_ctrl_c(signum=None, frame=None):
    """A SIGTERM handler (kill, a batch system's time limit, torchrun ending a job) that takes the Ctrl-C
    path: `atomic_directory` removes its temporary folder on the way out, and earlier results stay."""
    raise KeyboardInterrupt


def run_script(main, config, out_dir):
    """A script's `__main__` block: `main(config)`, with the errors a user meets turned into one line.

    - a bad option, a missing file, a failed torchrun rendezvous: `error: ...` and exit status 1;
    - Ctrl-C or SIGTERM: `interrupted; OUT unchanged` (atomic_directory removed the half-written
      folder) and exit status 130, as shells report an interrupted command;
    - under torchrun only rank 0 prints, so each message appears once; an error of another rank alone
      is printed by rank 0 (from the job's store: runtime/distributed.py report_failure).

    Returns what main returned.
    """
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    before = folder_identity(out_dir)
    speaks = is_main_process_from_env()
    try:
        return main(config)
    except KeyboardInterrupt:
        if speaks and failure_elsewhere():  # torchrun stopped this rank because another one failed
            sys.exit(f"error: {failure_elsewhere()}")
        if speaks:
            written = folder_identity(out_dir) != before
            print(f"\ninterrupted; {out_dir} " + ("was already written" if written else "unchanged"),
                  file=sys.stderr)
        sys.exit(130)
    except (FileNotFoundError, ValueError, RendezvousError) as error:
        if not speaks:  # rank 0 prints it if this rank alone failed (runtime/distributed.py report_failure)
            report_failure(f"{error} (process {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')})")
        sys.exit(f"error: {error}" if speaks else 1)
    except RuntimeError:
        if speaks and failure_elsewhere():  # a collective broke because another rank exited with an error
            sys.exit(f"error: {failure_elsewhere()}")
        raise


def finite_float(text: str) -> float:
    """float(text), refusing nan and inf: argparse then says `argument --lr: 'inf' is not a finite number`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number (nan and inf are not accepted)")
    return value


def _value_type(field):
    """int, float or str from a field's annotation; `int | None` gives int.

    subtle: float("nan") and float("inf") parse, but no option here means them, so a float option is
    finite unless its field says otherwise: dataclasses.field(default=..., metadata={"allow_non_finite": True}).
    """
    annotation = field.type
    candidates = [t for t in typing.get_args(annotation) if t is not type(None)] or [annotation]
    kind = candidates[0]
    if kind is float and not field.metadata.get("allow_non_finite", False):
        return finite_float
    return kind if kind in (int, float) else str
