"""`python -m factoryd` runs the command line interface."""

from factoryd.cli.main import main

main()
