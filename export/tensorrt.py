"""Moved: engines are built on the device by the runtime's `vce build`
(vce_deploy/engine_build.py), which needs tensorrt and the bundle, never torch or this
package. `python -m export.tensorrt ARGS` forwards to `vce build ARGS` for old scripts."""
from __future__ import annotations

import sys

from vce_deploy.cli import main as vce_main


def main(argv=None) -> int:
    return vce_main(["build", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
