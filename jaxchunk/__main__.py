"""`python -m jaxchunk ...` runs the `jaxchunk` command (see jaxchunk/cli.py)."""
import sys

from jaxchunk.cli import main

sys.exit(main())
