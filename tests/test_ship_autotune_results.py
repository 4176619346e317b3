"""Merging XLA autotuning dumps into the shipped results (tools/ship_autotune_results.py)."""

import json

import pytest

from tools.ship_autotune_results import merge_autotune_results, results_file_name, ship_results, top_level_blocks

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

# jaxlib 0.11.2's format (entries keyed by a device hash and the fusion's fingerprint).
DUMP_NEW = '''entries {
  key {
    target {
      device: "ed0e56ab8b2a0ecb"
      hlo_fingerprint: "ffd255041c538d5f05c55eb48c282345"
    }
    environment {
      codegen_version: "fe9062d0fff82a66"
    }
  }
  value {
    optimal_config {
      backend: TRITON
      backend_config {
        triton {
          block_m: 64
        }
      }
    }
    optimal_backend_version: "a77e7c793abc0d0c923a9afb275058e2fe57a198"
  }
}
entries {
  key {
    target {
      device: "ed0e56ab8b2a0ecb"
      hlo_fingerprint: "fdf5c6a1e3f33b85ed838af37ee98249"
    }
  }
  value {
    optimal_config {
      backend: CUDNN
    }
    optimal_backend_version: "9.19.0"
  }
}
'''


def test_blocks_are_split_at_the_top_level_whatever_braces_the_strings_hold():
    scalars, blocks = top_level_blocks(DUMP_A)
    assert scalars == ["version: 3"]
    assert len(blocks) == 2 and blocks[0].endswith("}\n}") and "algo_id: 12" in blocks[1]


def test_merging_keeps_every_distinct_result_once_in_order():
    merged, conflicts = merge_autotune_results([DUMP_A, DUMP_B])
    scalars, blocks = top_level_blocks(merged)
    assert scalars == ["version: 3"] and len(blocks) == 3 and conflicts == 0
    assert "gemm" in blocks[0] and "Cores: 108" in blocks[2]
    assert merge_autotune_results([merged, DUMP_B]) == (merged, 0)


def test_results_of_another_format_version_or_a_cut_file_are_refused():
    with pytest.raises(ValueError, match="different formats"):
        merge_autotune_results([DUMP_A, DUMP_B.replace("version: 3", "version: 4")])
    with pytest.raises(ValueError, match="unbalanced"):
        top_level_blocks(DUMP_A[:-3])


def test_jaxlib_0_11_entries_merge_the_same_way():
    first, second = top_level_blocks(DUMP_NEW)[1]
    assert top_level_blocks(DUMP_NEW)[0] == [] and "TRITON" in first and "CUDNN" in second
    merged, conflicts = merge_autotune_results([DUMP_NEW, "entries {\n" + second.split("{", 1)[1] + "\n"])
    assert len(top_level_blocks(merged)[1]) == 2 and conflicts == 0


def test_one_result_per_key_the_first_kept_and_the_conflicts_counted():
    # Two dumps may choose different kernels for one fusion (timings within noise): one is kept.
    other_choice = DUMP_NEW.replace("backend: CUDNN", "backend: NATIVE_EMITTER")
    merged, conflicts = merge_autotune_results([DUMP_NEW, other_choice])
    blocks = top_level_blocks(merged)[1]
    assert len(blocks) == 2 and conflicts == 1 and "CUDNN" in blocks[1]


def test_each_build_gets_its_own_file():
    cu12 = {"jaxlib": "0.11.2", "jax-cuda12-plugin": "0.11.2", "nvidia-cudnn-cu12": "9.10.2.21"}
    cu13 = {"jaxlib": "0.11.2", "jax-cuda13-plugin": "0.11.2", "nvidia-cudnn-cu13": "9.19.0.56"}
    assert results_file_name(cu12) != results_file_name(cu13)
    assert results_file_name(cu12) == results_file_name(dict(reversed(list(cu12.items()))))
    assert results_file_name(cu12).startswith("xla_autotune_0.11.2_")


def test_shipping_merges_into_the_versions_results_or_replaces_them(tmp_path):
    versions = {"jaxlib": "0.11.2", "nvidia-cudnn-cu13": "9.19.0.56"}
    other = {"jaxlib": "0.10.2"}
    ship_results(tmp_path, [DUMP_B], ["b"], ["GPU 8"], other)  # another build's file: never touched
    path, count, _, _ = ship_results(tmp_path, [DUMP_A], ["a"], ["GPU 9"], versions)
    assert count == 2
    path, count, _, devices = ship_results(tmp_path, [DUMP_B], ["b"], ["GPU 8"], versions)
    assert count == 3 and devices == ["GPU 8", "GPU 9"]  # merged: A's results and B's new one
    path, count, _, devices = ship_results(tmp_path, [DUMP_B], ["b"], ["GPU 8"], versions, replace=True)
    assert count == 2 and devices == ["GPU 8"]  # replaced: B's alone
    assert "gemm" not in path.read_text()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["versions"] for e in manifest["files"]] == [other, versions]
    assert [e["programs"] for e in manifest["files"]] == [["b"], ["b"]]
    assert sorted(p.name for p in tmp_path.glob("*.textproto")) == sorted(e["file"] for e in manifest["files"])
