"""``torchrun -m flamingo_data.train <options>``: ``flamingo-data train <options>`` in every rank,
errors mapped to exit codes as for every command."""

import sys

from flamingo_data.cli.main import main

sys.exit(main(["train", *sys.argv[1:]]))
