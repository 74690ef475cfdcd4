"""`python -m demo`: the built-in demo (demo/run.py, docs/demo.md)."""
import sys

from dvdq_core.cli import user_errors

from .run import main

sys.exit(user_errors(main, sys.argv[1:]))
