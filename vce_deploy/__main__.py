"""`python -m vce_deploy ...` is the `vce` command."""
from .cli import main

raise SystemExit(main())
