"""`python -m distill ...` runs the mobiledistill command line (also under `accelerate launch -m distill`)."""

from distill.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
