"""`python -m benchmarks`: run the whole benchmark suite (see benchmarks/run.py for the options)."""

import sys

from benchmarks.run import main, parse_args, rerender

if __name__ == "__main__":
    cli_config, from_json = parse_args(sys.argv[1:])
    if from_json:
        rerender(from_json, cli_config.out_dir)
    else:
        main(cli_config)
