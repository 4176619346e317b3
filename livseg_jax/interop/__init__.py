"""PyTorch interchange: a name table and converters (numpy only), safe weight-file I/O, and the
PyTorch twins of the model family.

Importing this package never imports torch; `livseg_jax.interop.torch_models` (the twins and their
re-parameterisation) does, and needs the `torch` extra.
"""

from livseg_jax.interop.io import load_state_dict, save_state_dict
from livseg_jax.interop.mapping import (
    RULES,
    ConversionError,
    flax_to_torch,
    flax_variable_shapes,
    format_table,
    mapping_table,
    state_dict_to_variables,
    torch_to_flax,
    variables_to_state_dict,
)

__all__ = [
    "RULES", "ConversionError", "flax_to_torch", "flax_variable_shapes", "format_table",
    "load_state_dict", "mapping_table", "save_state_dict",
    "state_dict_to_variables", "torch_to_flax", "variables_to_state_dict",
]
