import argparse
import sys

from bench.cli import _bench, add_arguments

parser = argparse.ArgumentParser(prog="python -m bench")
add_arguments(parser)
sys.exit(_bench(parser.parse_args()))
