"""Converting Meta's SAM 2 / 2.1 PyTorch checkpoints (`sam2.1_hiera_*.pt`) to Flax params.

A converted checkpoint is a directory:
  DIR/params/         Orbax checkpoint of the Flax param tree (image path)
  DIR/sam2_meta.json  {"format", "variant", "config", "source", "sha256", "skipped_video_keys"}
written to a temporary sibling directory and renamed into place.

The conversion is a tree walk (`image_encoder.trunk.blocks.3.attn.qkv.weight` ->
`image_encoder/trunk/blocks_3/attn/qkv/kernel`); only leaf layouts change (Linear (out, in)
-> (in, out), Conv OIHW -> HWIO, ConvTranspose (in, out, kh, kw) -> (kh, kw, in, out),
LayerNorm weight -> scale, Embedding weight -> embedding). The video-memory tensors
(`memory_attention.*`, `memory_encoder.*`, object pointers, ...) are not part of the image
path: they are counted and skipped. Any other key that does not fit is an error.

The variant is read off the shapes (trunk width, blocks per stage, position-embedding sizes)
and matched to a preset, which supplies what shapes do not show (heads, global blocks,
window sizes).
"""

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np

from fusionsam_jax.models.sam2.sam2 import SAM2_PRESETS, Sam2, Sam2Config, preset_name
from fusionsam_jax.models.sam.checkpoint import (CheckpointError, _flax_path, check_output_dir,
                                          load_torch_state_dict, read_converted_meta,
                                          restore_params_dir,
                                          write_params_dir, sha256sum)

FORMAT = "fusionsam_jax.sam2/1"
META_FILE = "sam2_meta.json"
PARAMS_DIR = "params"
PREFIXES = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.")
TOP_LEVEL = ("no_mem_embed",)
VIDEO_PREFIXES = ("memory_attention.", "memory_encoder.", "obj_ptr_proj.", "obj_ptr_tpos_proj.",
                  "mask_downsample.", "maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr",
                  "no_obj_embed_spatial")
_CONV_TRANSPOSE = ("sam_mask_decoder/output_upscaling/layers_0",
                   "sam_mask_decoder/output_upscaling/layers_3")

__all__ = ["CheckpointError", "infer_config", "convert_state_dict", "convert_file",
           "save_sam2_checkpoint", "load_sam2_checkpoint", "load_sam2_any", "read_sam2_meta"]


def _shape(sd, key, path, ndim: int):
  if key not in sd:
    raise CheckpointError(f"{path}: missing key {key!r}: not a SAM 2 checkpoint?")
  shape = tuple(np.shape(sd[key]))
  if len(shape) != ndim:
    raise CheckpointError(f"{path}: key {key!r} has shape {shape}, expected a {ndim}-D tensor")
  return shape


def infer_config(sd: Mapping[str, Any], path: str = "checkpoint") -> Sam2Config:
  """The preset whose shapes the state dict has. Raises CheckpointError if none fits."""
  embed_dim = _shape(sd, "image_encoder.trunk.patch_embed.proj.weight", path, 4)[0]
  bkg = _shape(sd, "image_encoder.trunk.pos_embed", path, 4)[2:]
  win = _shape(sd, "image_encoder.trunk.pos_embed_window", path, 4)[2]
  d_model = _shape(sd, "sam_prompt_encoder.no_mask_embed.weight", path, 2)[1]
  depth = 0
  while f"image_encoder.trunk.blocks.{depth}.norm1.weight" in sd:
    depth += 1
  if depth == 0:
    raise CheckpointError(f"{path}: missing key 'image_encoder.trunk.blocks.0.norm1.weight'")
  # A block with a `proj` starts a new stage.
  starts = [i for i in range(depth) if f"image_encoder.trunk.blocks.{i}.proj.weight" in sd]
  bounds = [0] + starts + [depth]
  stages = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
  for name, cfg in SAM2_PRESETS.items():
    if (cfg.embed_dim, tuple(cfg.stages), tuple(cfg.window_pos_embed_bkg_spatial_size),
        cfg.window_spec[0], cfg.d_model) == (embed_dim, stages, tuple(bkg), win, d_model):
      return cfg
  raise CheckpointError(
      f"{path}: no SAM 2 variant has these shapes (trunk width {embed_dim}, blocks per stage "
      f"{list(stages)}, position embedding {list(bkg)}/{win}, d_model {d_model}); known: "
      + ", ".join(SAM2_PRESETS))


def _to_flax_leaf(path: Tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    if value.ndim == 2:
      return value.T
    if value.ndim == 4:
      if "/".join(path[:-1]) in _CONV_TRANSPOSE:
        return value.transpose(2, 3, 0, 1)
      return value.transpose(2, 3, 1, 0)
  return value


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: Optional[Sam2Config] = None,
                       path: str = "checkpoint"):
  """PyTorch SAM 2 state dict -> (Sam2Config, Flax params, number of skipped video keys)."""
  cfg = cfg or infer_config(sd, path)
  abstract = jax.eval_shape(lambda: Sam2(cfg).init_params(jax.random.PRNGKey(0)))
  expected = {tuple(str(k.key) for k in kp): v for kp, v in
              jax.tree_util.tree_flatten_with_path(abstract)[0]}
  unexpected, filled, skipped = [], {}, 0
  for key, value in sd.items():
    if key.startswith(VIDEO_PREFIXES):
      skipped += 1
      continue
    if key in TOP_LEVEL:
      fpath = (key,)
    elif key.startswith(PREFIXES):
      top, rest = key.split(".", 1)
      sub = _flax_path(rest, abstract[top]) if top in abstract else ()
      fpath = (top,) + sub if sub else ()
    else:
      fpath = ()
    if not fpath or fpath not in expected:
      unexpected.append(key)
      continue
    arr = _to_flax_leaf(fpath, np.asarray(value))
    if tuple(arr.shape) != tuple(expected[fpath].shape):
      raise CheckpointError(
          f"{path}: shape mismatch for {key!r}: expected {tuple(expected[fpath].shape)} "
          f"(Flax layout, {'/'.join(fpath)}), found {tuple(arr.shape)}")
    filled[fpath] = arr.astype(np.float32)
  missing = sorted("/".join(p) for p in expected if p not in filled)
  if missing or unexpected:
    msg = []
    if missing:
      msg.append(f"missing keys (Flax paths) [{len(missing)}]: {', '.join(missing[:20])}"
                 + (" ..." if len(missing) > 20 else ""))
    if unexpected:
      msg.append(f"unexpected keys [{len(unexpected)}]: {', '.join(sorted(unexpected)[:20])}"
                 + (" ..." if len(unexpected) > 20 else ""))
    raise CheckpointError(f"{path}: " + "; ".join(msg))
  params: Dict[str, Any] = {}
  for fpath, arr in filled.items():
    node = params
    for p in fpath[:-1]:
      node = node.setdefault(p, {})
    node[fpath[-1]] = arr
  return cfg, params, skipped


def save_sam2_checkpoint(output_dir: str, cfg: Sam2Config, params, meta: Optional[dict] = None,
                         overwrite: bool = False, inputs: Tuple[str, ...] = ()) -> str:
  """Writes params + metadata atomically (temp dir, then rename; `write_params_dir`)."""
  full_meta = {"format": FORMAT, "variant": preset_name(cfg) or "custom",
               "config": cfg.to_dict(), **(meta or {})}
  return write_params_dir(output_dir, params, full_meta, overwrite, meta_file=META_FILE,
                          inputs=inputs)


def read_sam2_meta(ckpt_dir: str) -> dict:
  return read_converted_meta(ckpt_dir, META_FILE, FORMAT, "SAM 2",
                             "tools/convert_sam2_weights.py")


def load_sam2_checkpoint(ckpt_dir: str):
  """-> (Sam2Config, params) from a directory written by `save_sam2_checkpoint`."""
  meta = read_sam2_meta(ckpt_dir)
  cfg = Sam2Config.from_dict(meta["config"])
  abstract = jax.eval_shape(lambda: Sam2(cfg).init_params(jax.random.PRNGKey(0)))
  return cfg, restore_params_dir(ckpt_dir, abstract)


def convert_file(checkpoint: str, output: str, model_type: str = "auto",
                 overwrite: bool = False) -> Tuple[Sam2Config, str]:
  """The converter CLI's work: .pt -> checkpoint directory. Raises CheckpointError."""
  check_output_dir(output, overwrite, META_FILE, FORMAT, (checkpoint,))
  if model_type != "auto" and model_type not in SAM2_PRESETS:
    raise CheckpointError(f"--model_type {model_type!r}: expected auto, "
                          + ", ".join(SAM2_PRESETS))
  sd = load_torch_state_dict(checkpoint)
  cfg = infer_config(sd, checkpoint)
  if model_type != "auto" and SAM2_PRESETS[model_type] != cfg:
    raise CheckpointError(f"{checkpoint}: --model_type {model_type} given, but the tensor "
                          f"shapes are those of {preset_name(cfg)}")
  cfg, params, skipped = convert_state_dict(sd, cfg, checkpoint)
  meta = {"source": os.path.basename(checkpoint), "sha256": sha256sum(checkpoint),
          "skipped_video_keys": skipped}
  save_sam2_checkpoint(output, cfg, params, meta, overwrite=overwrite, inputs=(checkpoint,))
  return cfg, output


def load_sam2_any(checkpoint: str):
  """(Sam2Config, params) from a converted directory, an official `.pt` (converted in memory;
  needs PyTorch) or a folder holding exactly one `.pt` (a Hugging Face `facebook/sam2*`
  download)."""
  checkpoint = os.fspath(checkpoint)
  if os.path.isdir(checkpoint):
    if os.path.isfile(os.path.join(checkpoint, META_FILE)):
      return load_sam2_checkpoint(checkpoint)
    pts = sorted(f for f in os.listdir(checkpoint) if f.endswith(".pt"))
    if len(pts) != 1:
      found = f"{len(pts)} .pt files" if pts else "no .pt file"
      raise CheckpointError(f"{checkpoint}: neither a converted SAM 2 checkpoint ({META_FILE}) "
                            f"nor a folder with one official .pt ({found})")
    checkpoint = os.path.join(checkpoint, pts[0])
  sd = load_torch_state_dict(checkpoint)
  cfg, params, _ = convert_state_dict(sd, None, checkpoint)
  return cfg, params
