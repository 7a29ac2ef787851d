"""The benchmark suite, the same code as ``stable-regions bench``.

python benchmarks/run.py [--quick] [--model SPEC] [--out FILE]
"""

import sys

from stable_regions.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
