"""The `factoryd` command line: the root command in `main`, shared options in `opts`, a module per group."""
