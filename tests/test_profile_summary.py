"""experiments/profile_train_step.py's trace summary: kernel kinds, layers from HLO metadata, and
the summary made again from a kept trace."""

import gzip
import json

from experiments import profile_train_step
from experiments.profile_train_step import hlo_op_names, kernel_kind, layer_of, summarise

HLO = """
%fused_computation.7 (param_0: bf16[8]) -> bf16[8] {
  %param_0 = bf16[8]{0} parameter(0)
  ROOT %mul.1 = bf16[8]{0} multiply(%param_0, %param_0), metadata={op_name="jit(step)/transpose(jvp(UNet3D))/msca4/attention/dw5/mul"}
}

ENTRY %main.9 (p: bf16[8]) -> bf16[8] {
  %p = bf16[8]{0} parameter(0)
  %input_multiply_reduce_fusion.3 = bf16[8]{0} fusion(%p), kind=kInput, calls=%fused_computation.7
  ROOT %custom-call.2 = bf16[8]{0} custom-call(%p), custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/jvp(UNet3D)/enc0/rep0/dense/conv/conv_general_dilated"}
}
"""  # noqa: E501 (HLO lines as XLA prints them)


def test_fusions_without_metadata_take_the_name_stack_of_what_they_compute():
    names = hlo_op_names(HLO)
    assert names["input_multiply_reduce_fusion.3"].endswith("msca4/attention/dw5/mul")
    assert names["input_multiply_reduce_fusion_3"] == names["input_multiply_reduce_fusion.3"]  # kernel spelling
    assert layer_of(names["custom-call.2"], 3) == "enc0/rep0/dense"
    # Forward and backward ops of a layer share one bucket: transformation wrappers are dropped.
    assert layer_of(names["input_multiply_reduce_fusion.3"], 3) == "msca4/attention/dw5"


def test_kernel_kinds_from_names():
    assert kernel_kind("sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16") == "convolution"
    assert kernel_kind("gemm_fusion_dot_432") == "matmul"
    assert kernel_kind("input_add_multiply_reduce_fusion_1") == "reduction"
    assert kernel_kind("loop_add_fusion_26") == "elementwise fusion"
    assert kernel_kind("loop_slice_transpose_fusion_3") == "copy/transpose"
    assert kernel_kind("input_convert_reduce_fusion_5") == "reduction"  # a convert, not a convolution
    assert kernel_kind("loop_convert_fusion") == "elementwise fusion"
    assert kernel_kind("cudnn-conv-bw-filter.20") == "convolution"


EVENTS = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #14(Compute)"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "tid": 7, "name": "input_multiply_reduce_fusion_3", "dur": 3000.0, "args": {}},
        {"ph": "X", "pid": 1, "tid": 7, "name": "input_multiply_reduce_fusion_3", "dur": 1000.0, "args": {}},
        {"ph": "X", "pid": 1, "tid": 7, "name": "sm80_xmma_fprop_implicit_gemm", "dur": 2000.0,
         "args": {"hlo_op": "custom-call.2"}},
        {"ph": "X", "pid": 2, "tid": 3, "name": "python", "dur": 9e6, "args": {}},
]


def test_summary_counts_device_streams_per_step_and_ignores_the_host():
    summary = summarise(EVENTS, steps=2, depth=3, op_names=hlo_op_names(HLO))
    assert summary["kernel_ms_per_step"] == 3.0  # (3 + 1 + 2 ms) over 2 steps; the host is left out
    kinds = {row["name"]: row["ms_per_step"] for row in summary["by_kind"]}
    assert kinds == {"reduction": 2.0, "convolution": 1.0}
    layers = {row["name"]: row["ms_per_step"] for row in summary["by_layer"]}
    assert layers == {"msca4/attention/dw5": 2.0, "enc0/rep0/dense": 1.0}
    assert {row["name"]: row["ms_per_step"] for row in summary["by_block"]} == {"msca4/attention": 2.0,
                                                                               "enc0/rep0": 1.0}
    assert summary["kernel_launches_per_step"] == 1.5  # 3 kernels over 2 steps
    by_op = {row["name"]: row for row in summary["by_op_name"]}
    assert by_op[hlo_op_names(HLO)["input_multiply_reduce_fusion.3"]]["launches_per_step"] == 1.0
    assert summary["top_kernels"][0]["calls_per_step"] == 1.0


def test_resummarise_rewrites_the_summary_of_a_result_from_its_trace(tmp_path, monkeypatch):
    monkeypatch.setattr(profile_train_step, "RESULTS", tmp_path)
    stale = {"steps": 2, "kernel_ms_per_step": 99.0, "by_kind": [{"name": "convolution", "ms_per_step": 99.0}],
             "loss": 1.5}
    (tmp_path / "profile_train_step_x.json").write_text(json.dumps(stale))
    trace = tmp_path / "trace"
    trace.mkdir()
    with gzip.open(trace / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": EVENTS}, f)
    with gzip.open(tmp_path / "optimised_hlo.txt.gz", "wt") as f:
        f.write(HLO)
    profile_train_step.resummarise("profile_train_step_x", trace, tmp_path / "optimised_hlo.txt.gz", 3)
    got = json.loads((tmp_path / "profile_train_step_x.json").read_text())
    assert got["kernel_ms_per_step"] == 3.0 and got["loss"] == 1.5  # the summary replaced, the rest kept
    assert {row["name"] for row in got["by_layer"]} == {"msca4/attention/dw5", "enc0/rep0/dense"}
