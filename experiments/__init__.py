"""Benchmarks and studies, run from the repository root as `python -m experiments.NAME`.

`results/` keeps the current JSON of each study; `results/README.md` maps every figure quoted in
README.md and docs/ to its file and the command that wrote it.
"""
