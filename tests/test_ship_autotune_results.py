"""Merging XLA autotuning dumps into the shipped results (tools/ship_autotune_results.py)."""

import pytest

from tools.ship_autotune_results import merge_autotune_results, top_level_blocks

# The shape of XLA's AutotuneResults text format; the HLO strings hold braces and escaped quotes.
DUMP_A = '''version: 3
results {
  device: "CUDA: 9.0, Cores: 132"
  hlo: "{\\n  p0 = f32[2]{0} parameter(0)\\n  ROOT c = f32[2]{0} copy(p0), metadata={op_name=\\"a}\\"}\\n}"
  result {
    gemm { algorithm: 7 }
  }
}
results {
  device: "CUDA: 9.0, Cores: 132"
  hlo: "{ conv }"
  result { algorithm { algo_id: 12 } }
}
'''
DUMP_B = '''version: 3
results {
  device: "CUDA: 9.0, Cores: 132"
  hlo: "{ conv }"
  result { algorithm { algo_id: 12 } }
}
results {
  device: "CUDA: 8.0, Cores: 108"
  hlo: "{ conv }"
  result { algorithm { algo_id: 3 } }
}
'''


def test_blocks_are_split_at_the_top_level_whatever_braces_the_strings_hold():
    scalars, blocks = top_level_blocks(DUMP_A)
    assert scalars == ["version: 3"]
    assert len(blocks) == 2 and blocks[0].endswith("}\n}") and "algo_id: 12" in blocks[1]


def test_merging_keeps_every_distinct_result_once_in_order():
    merged = merge_autotune_results([DUMP_A, DUMP_B])
    scalars, blocks = top_level_blocks(merged)
    assert scalars == ["version: 3"] and len(blocks) == 3
    assert "gemm" in blocks[0] and "Cores: 108" in blocks[2]
    assert merge_autotune_results([merged, DUMP_B]) == merged


def test_results_of_another_format_version_or_a_cut_file_are_refused():
    with pytest.raises(ValueError, match="different formats"):
        merge_autotune_results([DUMP_A, DUMP_B.replace("version: 3", "version: 4")])
    with pytest.raises(ValueError, match="unbalanced"):
        top_level_blocks(DUMP_A[:-3])
