import sys

from bench.cli import main_args

sys.exit(main_args())
