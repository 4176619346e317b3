"""Data: NIfTI I/O, dataset layouts, the 3D-IRCADb importer, preprocessing, cache, phantoms."""
