"""`python -m distill ...` (and `accelerate launch -m distill ...`) runs the mobiledistill command line.

The command line is the application layer (`mobiledistill`), which imports this package; it is run here as a
module rather than imported, so the library does not depend on its application.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("mobiledistill", run_name="__main__", alter_sys=True)
