"""`python -m factoryd` runs the command line interface."""

from factoryd.cli import main

main()
