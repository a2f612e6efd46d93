"""``python -m ctopd ...`` runs the command line."""

from ctopd.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
