"""`python -m bench ARGS`: the latency benchmark (bench/latency.py), from the source tree."""
import sys

from .latency import main

sys.exit(main())
