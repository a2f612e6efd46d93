"""Subcommands of the ``ctopd`` command line, one module each."""
