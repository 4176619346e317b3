"""Data: NIfTI I/O, dataset layouts, the 3D-IRCADb importer, preprocessing, cache, phantoms.

Import from the modules (`livseg_jax.data.nifti`, `.layouts`, `.ircadb`, `.preprocess`, `.cache`,
`.synthetic`): nothing is re-exported here, so that `livseg_jax.data.preprocess` stays the module
(it also defines a function `preprocess`) and importing the package costs nothing.
"""
