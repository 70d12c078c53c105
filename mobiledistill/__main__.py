"""`python -m mobiledistill ...` runs the command line."""

from mobiledistill.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
