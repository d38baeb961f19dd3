"""python bench/latency.py [ARGS]: the latency benchmark, the same code as `python -m bench`
(bench/__main__.py has the arguments; `--help` lists them). Runs from a clone without installing."""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # the repository root in place of bench/ itself, whose profile.py would shadow the stdlib's
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    from bench.__main__ import main

    sys.exit(main())
