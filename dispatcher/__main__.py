"""`python -m dispatcher` is the same as the `sfn-dispatcher` command."""

from dispatcher.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
