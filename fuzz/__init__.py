"""Fuzzing the parsers that take outside input (docs/signing.md "Fuzzing"): targets.py holds the
targets, `python -m fuzz TARGET` runs one under atheris (coverage-guided, libFuzzer)."""
