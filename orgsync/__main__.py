"""``python -m orgsync``: the same command line as the ``orgsync`` console script."""

from __future__ import annotations

from orgsync.cli import main

if __name__ == "__main__":
    main()
