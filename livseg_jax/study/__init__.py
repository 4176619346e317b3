"""Studies: declared lists of runs trained, predicted on a test split, evaluated and tabulated
beside the published numbers (`python -m livseg_jax.study`, docs/studies.md)."""
