"""`python -m benchmarks`: run the whole benchmark suite (see benchmarks/run.py for the options)."""

import sys

from benchmarks.run import main, parse_args

if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
