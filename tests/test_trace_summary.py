"""benchmarks/trace_summary.py on a hand-written Perfetto trace: device kernels only, per
step, the busy time as the union of overlapping kernels (worked out by hand below)."""

import gzip
import json

import pytest

from benchmarks import trace_summary as T


def _write(path, events):
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_summary_of_a_two_step_trace(tmp_path):
  meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
          {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
  k = lambda name, ts, dur: {"ph": "X", "pid": 2, "tid": 7, "ts": ts, "dur": dur, "name": name}
  events = meta + [
      {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 5000, "name": "PjitFunction(step)"},
      k("sm90_xmma_gemm_bf16", 0, 1000), k("loop_add_fusion", 500, 1000),   # overlap 500
      k("sm90_xmma_gemm_bf16", 3000, 1000), k("cudnn_flash_attn_fwd", 6000, 2000)]
  p = tmp_path / "perfetto_trace.json.gz"
  _write(p, events)
  s = T.summarize(str(p), steps=2, wall_s=0.010)
  # Kernels: 1000 + 1000 + 1000 + 2000 us = 5 ms over 2 steps; the host event is not one.
  assert s["kernel_ms_per_step"] == pytest.approx(2.5)
  # Busy: [0, 1500] + [3000, 4000] + [6000, 8000] = 1.5 + 1 + 2 = 4.5 ms over 2 steps.
  assert s["device_busy_ms_per_step"] == pytest.approx(2.25)
  assert s["wall_ms_per_step"] == pytest.approx(5.0)
  assert s["idle_ms_per_step"] == pytest.approx(2.75)
  assert s["by_class_ms_per_step"] == pytest.approx(
      {"matmul": 1.0, "attention": 1.0, "other fusion": 0.5})
  top = s["top_kernels"][0]
  assert (top["class"], top["calls_per_step"]) in {("matmul", 1.0), ("attention", 0.5)}
  assert sum(t["share"] for t in s["top_kernels"]) == pytest.approx(1.0)


def test_a_trace_without_device_kernels_is_refused(tmp_path):
  p = tmp_path / "perfetto_trace.json.gz"
  _write(p, [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
             {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 5, "name": "op"}])
  with pytest.raises(ValueError, match="no device kernels"):
    T.summarize(str(p), steps=1)


@pytest.mark.parametrize("name,cls", [
    ("loop_convert_fusion_43", "other fusion"),        # a dtype cast, not a convolution
    ("sm80_xmma_fprop_implicit_gemm_indexed_bf16bf16", "convolution"),
    ("convolution_fusion_2", "convolution"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"),
    ("nvjet_sm90_tst_128x128_64x6_2x1_v_bz_bias_NNT", "matmul"),
    ("input_slice_transpose_fusion_27", "copy/transpose")])
def test_kernel_classes_of_names_seen_in_h200_profiles(name, cls):
  assert T.kernel_class(name) == cls
