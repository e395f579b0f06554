"""Converting official PyTorch SAM checkpoints to Flax params, and loading the result.

A converted checkpoint is a directory:
  DIR/params/        Orbax checkpoint of the Flax param tree
  DIR/sam_meta.json  {"format", "variant", "config", "source", "sha256"}
It is written to a temporary sibling directory and renamed into place, so an interrupted
conversion never leaves something that looks like a checkpoint.

The conversion is a tree walk: a PyTorch key `blocks.3.attn.qkv.weight` names the Flax path
`image_encoder/blocks_3/attn/qkv/kernel`; only the leaf layout changes
(Linear (out, in) -> (in, out), Conv OIHW -> HWIO, ConvTranspose (in, out, kh, kw) ->
(kh, kw, in, out), LayerNorm weight -> scale, Embedding weight -> embedding).
"""

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from fusionsam_jax import fsutil
from fusionsam_jax.models.sam.sam import preset_name, Sam, SAM_PRESETS, SamConfig

FORMAT = "fusionsam_jax.sam/1"
META_FILE = "sam_meta.json"
PARAMS_DIR = "params"
PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
# Modules that are ConvTranspose2d in PyTorch (weight layout (in, out, kh, kw)).
_CONV_TRANSPOSE = ("mask_decoder/output_upscaling/layers_0", "mask_decoder/output_upscaling/layers_3")


class CheckpointError(ValueError):
  """A checkpoint file or directory is missing, unreadable or does not fit the model."""


def sha256sum(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads a `.pth` state dict with `torch.load(weights_only=True)` into numpy arrays."""
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the install
    raise CheckpointError("reading .pth files needs PyTorch: pip install 'fusionsam-jax[convert]'"
                          " (CPU build: pip install torch==2.13.0)") from e
  if os.path.islink(path) and not os.path.exists(path):
    try:
      os.stat(path)
    except OSError as e:
      raise CheckpointError(f"{path}: a symbolic link that cannot be followed "
                            f"({e.strerror})") from None
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: not a file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for bad files
    msg = str(e)
    if "Weights only load failed" in msg and ("GLOBAL" in msg or "global" in msg):
      raise CheckpointError(
          f"{path}: refused: the pickle would need code execution to load (only plain tensor "
          "state dicts are accepted)") from None
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    if "Weights only load failed" in msg:   # not a pickle torch can read at all
      detail = msg.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
      first = f"unpickling failed: {detail[0].strip()}" if detail and "WeightsUnpickler" in msg \
          else "unpickling failed"
    if len(first) > 160:
      first = first[:157] + "..."
    raise CheckpointError(f"{path}: not a readable PyTorch checkpoint "
                          f"(truncated or not a .pth file?): {first}") from None
  if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
    obj = obj["model"]
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict (mapping of names to tensors), "
                          f"found {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    out[k] = tensor_to_numpy(torch, path, k, v)
  return out


def tensor_to_numpy(torch, path: str, k, v) -> np.ndarray:
  """One state-dict entry as a float32 array; refuses (CheckpointError, naming the key) what
  a SAM checkpoint never holds: a non-string key, a non-tensor, a sparse / quantized /
  empty tensor, a non-floating dtype (int, bool, complex), NaN or Inf."""
  if not isinstance(k, str):
    raise CheckpointError(f"{path}: key {k!r} is a {type(k).__name__}, expected a string")
  if not isinstance(v, torch.Tensor):
    raise CheckpointError(f"{path}: key {k!r} is a {type(v).__name__}, expected a tensor")
  if v.layout != torch.strided:
    raise CheckpointError(f"{path}: key {k!r} is a {v.layout} tensor, expected a dense one")
  if v.is_quantized or v.is_complex() or not v.is_floating_point():
    raise CheckpointError(f"{path}: key {k!r} has dtype {v.dtype}, expected a floating-point "
                          "tensor (float32 / float16 / bfloat16 / float64)")
  if v.numel() == 0:
    raise CheckpointError(f"{path}: key {k!r} is empty (shape {tuple(v.shape)})")
  arr = v.detach().to(torch.float32).cpu().numpy()
  if not np.isfinite(arr).all():
    bad = int(np.size(arr) - np.isfinite(arr).sum())
    raise CheckpointError(f"{path}: key {k!r} has {bad} non-finite value(s) (NaN / Inf) of "
                          f"{arr.size}: a corrupt or diverged checkpoint")
  return arr


def _shape(sd, key, path, ndim: int):
  if key not in sd:
    raise CheckpointError(f"{path}: missing key {key!r}: not a SAM checkpoint?")
  shape = tuple(np.shape(sd[key]))
  if len(shape) != ndim:
    raise CheckpointError(f"{path}: key {key!r} has shape {shape}, expected a {ndim}-D tensor")
  return shape


def infer_config(sd: Mapping[str, np.ndarray], path: str = "checkpoint") -> SamConfig:
  """Reads every SAM size off the tensor shapes (so vit_b/l/h and custom sizes all work)."""
  embed_dim = _shape(sd, "image_encoder.patch_embed.proj.weight", path, 4)[0]
  patch = _shape(sd, "image_encoder.patch_embed.proj.weight", path, 4)[2]
  grid = _shape(sd, "image_encoder.pos_embed", path, 4)[1]
  depth = 0
  while f"image_encoder.blocks.{depth}.norm1.weight" in sd:
    depth += 1
  if depth == 0:
    raise CheckpointError(f"{path}: missing key 'image_encoder.blocks.0.norm1.weight'")
  rel_lens = [_shape(sd, f"image_encoder.blocks.{i}.attn.rel_pos_h", path, 2)[0]
              for i in range(depth)]
  head_dim = _shape(sd, "image_encoder.blocks.0.attn.rel_pos_h", path, 2)[1]
  global_idx = tuple(i for i, n in enumerate(rel_lens) if n == 2 * grid - 1)
  windowed = [n for n in rel_lens if n != 2 * grid - 1]
  window = (windowed[0] + 1) // 2 if windowed else 14
  prompt_dim = _shape(sd, "prompt_encoder.no_mask_embed.weight", path, 2)[1]
  mask_in = _shape(sd, "prompt_encoder.mask_downscaling.3.weight", path, 4)[0]
  dec_depth = 0
  while f"mask_decoder.transformer.layers.{dec_depth}.norm1.weight" in sd:
    dec_depth += 1
  mlp_dim = _shape(sd, "mask_decoder.transformer.layers.0.mlp.lin1.weight", path, 2)[0]
  iou_hidden = _shape(sd, "mask_decoder.iou_prediction_head.layers.0.weight", path, 2)[0]
  num_mask_tokens = _shape(sd, "mask_decoder.mask_tokens.weight", path, 2)[0]
  # The decoder's head count is not visible in shapes; SAM always uses 8 at width 256.
  dec_heads = 8 if prompt_dim == 256 else SAM_PRESETS["tiny"].decoder_num_heads
  cfg = SamConfig(
      encoder_embed_dim=int(embed_dim), encoder_depth=depth,
      encoder_num_heads=int(embed_dim // head_dim), encoder_global_attn_indexes=global_idx,
      window_size=int(window), patch_size=int(patch), img_size=int(grid * patch),
      prompt_embed_dim=int(prompt_dim), mask_in_chans=int(mask_in),
      decoder_transformer_depth=dec_depth, decoder_num_heads=dec_heads,
      decoder_mlp_dim=int(mlp_dim), iou_head_hidden_dim=int(iou_hidden),
      num_multimask_outputs=int(num_mask_tokens - 1))
  return cfg


def _flax_path(torch_key: str, tree: Mapping[str, Any]) -> Tuple[str, ...]:
  """Walks the Flax tree along a PyTorch key; `x.3` is `x_3` or `x/layers_3`."""
  parts = torch_key.split(".")
  path, node, i = [], tree, 0
  while i < len(parts):
    p = parts[i]
    if i + 1 < len(parts) and parts[i + 1].isdigit():
      n = parts[i + 1]
      if isinstance(node, Mapping) and f"{p}_{n}" in node:
        path.append(f"{p}_{n}")
        node = node[f"{p}_{n}"]
        i += 2
        continue
      if isinstance(node, Mapping) and p in node and f"layers_{n}" in node[p]:
        path += [p, f"layers_{n}"]
        node = node[p][f"layers_{n}"]
        i += 2
        continue
    if i == len(parts) - 1 and isinstance(node, Mapping):
      for cand in ({"weight": ("kernel", "scale", "embedding")}.get(p, (p,))):
        if cand in node:
          return tuple(path + [cand])
    if not isinstance(node, Mapping) or p not in node:
      return ()
    path.append(p)
    node = node[p]
    i += 1
  return tuple(path)


def _to_flax_leaf(path: Tuple[str, ...], value: np.ndarray, expected_ndim: int) -> np.ndarray:
  leaf = path[-1]
  if leaf == "kernel":
    if value.ndim == 2:  # Linear (out, in) -> (in, out)
      return value.T
    if value.ndim == 4:
      if "/".join(path[:-1]) in _CONV_TRANSPOSE:  # (in, out, kh, kw) -> (kh, kw, in, out)
        return value.transpose(2, 3, 0, 1)
      return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  return value


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: Optional[SamConfig] = None,
                       path: str = "checkpoint"):
  """PyTorch SAM state dict -> (SamConfig, Flax params). Raises CheckpointError on mismatch."""
  cfg = cfg or infer_config(sd, path)
  try:
    abstract = jax.eval_shape(lambda: Sam(cfg).init_params(jax.random.PRNGKey(0)))
  except Exception as e:  # sizes read off the shapes that make no model
    raise CheckpointError(f"{path}: its tensor shapes make no SAM model ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
  expected = {tuple(str(k.key) for k in kp): v for kp, v in
              jax.tree_util.tree_flatten_with_path(abstract)[0]}
  unexpected, filled = [], {}
  for key, value in sd.items():
    if not key.startswith(PREFIXES):
      unexpected.append(key)
      continue
    top, rest = key.split(".", 1)
    fpath = _flax_path(rest, abstract[top])
    fpath = (top,) + fpath if fpath else ()
    if not fpath or fpath not in expected:
      unexpected.append(key)
      continue
    arr = _to_flax_leaf(fpath, np.asarray(value), len(expected[fpath].shape))
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
  return cfg, params


def check_output_dir(output_dir: str, overwrite: bool, meta_file: str = META_FILE,
                     fmt: Optional[str] = None, inputs: Tuple[str, ...] = ()) -> None:
  """Raises CheckpointError unless `output_dir` may be (re)written by a converter: it does
  not exist, or, with `overwrite`, it is a directory this project wrote -- nothing in it but
  ``params/`` and `meta_file`, whose ``format`` is `fmt` -- (or an empty one); and it is not,
  and does not hold, one of `inputs`."""
  out = os.path.realpath(output_dir)
  for p in inputs:
    rp = os.path.realpath(p)
    if rp == out or rp.startswith(out.rstrip(os.sep) + os.sep):
      raise CheckpointError(f"{output_dir}: holds the input {p}; choose another --output")
  if not os.path.lexists(output_dir):
    return
  if not overwrite:
    raise CheckpointError(f"{output_dir}: already exists (pass --overwrite to replace it)")
  refuse = (f"; --overwrite replaces only a checkpoint directory written by this converter "
            f"(params/ and {meta_file}): remove it yourself or choose another --output")
  if os.path.islink(output_dir) or not os.path.isdir(output_dir):
    raise CheckpointError(f"{output_dir}: not a directory" + refuse)
  try:
    entries = set(os.listdir(output_dir))
  except OSError as e:
    raise CheckpointError(f"{output_dir}: cannot be read ({e.strerror})") from None
  if not entries:
    return
  foreign = sorted(entries - {PARAMS_DIR, meta_file})
  if foreign:
    raise CheckpointError(f"{output_dir}: holds {', '.join(foreign[:5])}"
                          + (" ..." if len(foreign) > 5 else "") + refuse)
  if meta_file not in entries:
    raise CheckpointError(f"{output_dir}: no {meta_file}" + refuse)
  try:
    with open(os.path.join(output_dir, meta_file)) as f:
      found = json.load(f).get("format")
  except (OSError, ValueError, AttributeError):
    found = None
  if fmt is not None and found != fmt:
    raise CheckpointError(f"{os.path.join(output_dir, meta_file)}: format {found!r}, "
                          f"expected {fmt!r}" + refuse)


def write_params_dir(output_dir: str, params, meta: dict, overwrite: bool = False,
                     meta_file: str = META_FILE, inputs: Tuple[str, ...] = ()) -> str:
  """Writes ``DIR/params`` (Orbax) + ``DIR/<meta_file>`` atomically: a temporary sibling
  directory renamed into place. An existing `output_dir` is replaced only with `overwrite`
  and only if this project wrote it (`check_output_dir`); never one holding `inputs`. The
  result has the modes of the umask (folders 0755, files 0644 under umask 022). Orphaned
  temporary siblings of killed runs are removed first. Any write failure (read-only or full
  disk, ...) raises CheckpointError and leaves nothing behind."""

  check_output_dir(output_dir, overwrite, meta_file, meta.get("format"), inputs)
  output_dir = os.path.abspath(output_dir)
  parent, base = os.path.dirname(output_dir), os.path.basename(output_dir)
  tmp = None
  try:
    os.makedirs(parent, exist_ok=True)
    fsutil.clean_orphans(parent, (f".{base}.tmp-", f".{base}.old-"))
    tmp = tempfile.mkdtemp(prefix=fsutil.temp_prefix(f".{base}.tmp-"), dir=parent)
    fsutil.chmod_like_new_dir(tmp)
    ckptr = ocp.StandardCheckpointer()
    try:
      ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
      ckptr.wait_until_finished()
    finally:
      try:   # waits for Orbax's writer threads, also after a failed write
        ckptr.close()
      except Exception:  # noqa: BLE001 -- the save's own error is the one reported
        pass
    with open(os.path.join(tmp, meta_file), "w") as f:
      json.dump(meta, f, indent=2)
      f.flush()
      os.fsync(f.fileno())
    if os.path.lexists(output_dir):
      old = tempfile.mkdtemp(prefix=fsutil.temp_prefix(f".{base}.old-"), dir=parent)
      os.rename(output_dir, os.path.join(old, "x"))
      try:
        os.rename(tmp, output_dir)
      except OSError:
        os.rename(os.path.join(old, "x"), output_dir)   # the previous checkpoint stays
        raise
      fsutil.rmtree(old)
    else:
      os.rename(tmp, output_dir)
    tmp = None
  except CheckpointError:
    raise
  except Exception as e:  # OSError (read-only, full disk), Orbax / tensorstore errors
    msg = e.strerror if isinstance(e, OSError) and e.strerror else (
        str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    raise CheckpointError(f"{output_dir}: cannot write the converted checkpoint ({msg}); "
                          "nothing was written") from None
  finally:
    if tmp is not None:
      fsutil.rmtree(tmp)
  return output_dir


def restore_params_dir(ckpt_dir: str, abstract):
  """The Orbax params of a directory written by `write_params_dir`, into `abstract`'s
  structure. Raises CheckpointError."""
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(os.path.abspath(os.path.join(ckpt_dir, PARAMS_DIR)), abstract)
  except Exception as e:
    raise CheckpointError(f"{ckpt_dir}: could not restore params: {e}") from None


def save_sam_checkpoint(output_dir: str, cfg: SamConfig, params, meta: Optional[dict] = None,
                        overwrite: bool = False, inputs: Tuple[str, ...] = ()) -> str:
  """Writes params + metadata atomically (temp dir, then rename; `write_params_dir`)."""
  full_meta = {"format": FORMAT, "variant": preset_name(cfg) or "custom",
               "config": cfg.to_dict(), **(meta or {})}
  return write_params_dir(output_dir, params, full_meta, overwrite, inputs=inputs)


def read_converted_meta(ckpt_dir: str, meta_file: str, fmt: str, what: str,
                        converter: str) -> dict:
  """The metadata of a directory a converter wrote; `CheckpointError` naming the file when it
  is missing or of another format (`what`: "SAM" / "SAM 2"; `converter`: its tool)."""
  meta_path = os.path.join(ckpt_dir, meta_file)
  if not os.path.isfile(meta_path):
    raise CheckpointError(f"{ckpt_dir}: not a converted {what} checkpoint (no {meta_file}); "
                          f"convert one with {converter}")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != fmt:
    raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {fmt!r}")
  return meta


def read_sam_meta(ckpt_dir: str) -> dict:
  return read_converted_meta(ckpt_dir, META_FILE, FORMAT, "SAM", "tools/convert_sam_weights.py")


def load_sam_checkpoint(ckpt_dir: str):
  """-> (SamConfig, params) from a directory written by `save_sam_checkpoint`."""
  meta = read_sam_meta(ckpt_dir)
  cfg = SamConfig.from_dict(meta["config"])
  abstract = jax.eval_shape(lambda: Sam(cfg).init_params(jax.random.PRNGKey(0)))
  return cfg, restore_params_dir(ckpt_dir, abstract)


def convert_file(checkpoint: str, output: str, model_type: str = "auto",
                 overwrite: bool = False) -> Tuple[SamConfig, str]:
  """The converter CLI's work: .pth -> checkpoint directory. Raises CheckpointError."""
  check_output_dir(output, overwrite, META_FILE, FORMAT, (checkpoint,))
  sd = load_torch_state_dict(checkpoint)
  cfg = infer_config(sd, checkpoint)
  if model_type != "auto":
    if model_type not in SAM_PRESETS:
      raise CheckpointError(f"--model_type {model_type!r}: expected auto, "
                            + ", ".join(SAM_PRESETS))
    if SAM_PRESETS[model_type] != cfg:
      found = preset_name(cfg) or "a custom size"
      raise CheckpointError(f"{checkpoint}: --model_type {model_type} given, but the tensor "
                            f"shapes are those of {found}")
  cfg, params = convert_state_dict(sd, cfg, checkpoint)
  meta = {"source": os.path.basename(checkpoint), "sha256": sha256sum(checkpoint)}
  save_sam_checkpoint(output, cfg, params, meta, overwrite=overwrite, inputs=(checkpoint,))
  return cfg, output


# ---- Hugging Face `facebook/sam-vit-*` safetensors (no PyTorch needed) ---------------------

_HF_RULES = (
    # (pattern, replacement) applied in order to the full key.
    (r"^shared_image_embedding\.positional_embedding$",
     "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^vision_encoder\.", "image_encoder."),
    (r"^image_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^image_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
    (r"^image_encoder\.layers\.(\d+)\.", r"image_encoder.blocks.\1."),
    (r"^image_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^image_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^image_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^image_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.",
     r"mask_decoder.transformer.layers.\1.norm\2."),
    (r"^mask_decoder\.transformer\.layer_norm_final_attn\.",
     "mask_decoder.transformer.norm_final_attn."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
)
# HF's decoder MLPs are proj_in, layers.0..L-1, proj_out; SAM's are layers.0..L+1.
_HF_MLP = r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\."


def hf_to_sam_state_dict(sd: Mapping[str, np.ndarray], path: str = "checkpoint"):
  """Hugging Face `SamModel` tensor names -> the official `segment_anything` names."""

  out: Dict[str, np.ndarray] = {}
  mlp_hidden: Dict[str, int] = {}
  for k in sd:
    m = re.match(_HF_MLP + r"layers\.(\d+)\.", k)
    if m:
      mlp_hidden[m.group(1)] = max(mlp_hidden.get(m.group(1), 0), int(m.group(2)) + 1)
  dup = "prompt_encoder.shared_embedding.positional_embedding"
  for k, v in sd.items():
    if k == dup:  # a tied copy of shared_image_embedding.positional_embedding
      continue
    new = k
    for pat, rep in _HF_RULES:
      new = re.sub(pat, rep, new)
    m = re.match(_HF_MLP + r"(proj_in|proj_out|layers\.(\d+))\.(.*)$", new)
    if m:
      base, part, idx, leaf = m.group(1), m.group(2), m.group(3), m.group(4)
      if part == "proj_in":
        n = 0
      elif part == "proj_out":
        n = mlp_hidden.get(base, 0) + 1
      else:
        n = int(idx) + 1
      new = f"{base}.layers.{n}.{leaf}"
    out[new] = v
  if dup in sd and "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" not in out:
    out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = sd[dup]
  return out


def _hf_decoder_heads(path: str) -> Optional[int]:
  cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
  if not os.path.isfile(cfg_path):
    return None
  try:
    with open(cfg_path) as f:
      return int(json.load(f)["mask_decoder_config"]["num_attention_heads"])
  except (ValueError, KeyError, TypeError):
    return None


def load_hf_safetensors(path: str):
  """`facebook/sam-vit-*` `model.safetensors` (or its folder) -> (SamConfig, params).

  Reads with safetensors' numpy API (no PyTorch). The decoder's head count comes from the
  `config.json` beside the file when there is one (it is not visible in tensor shapes).
  """
  if os.path.isdir(path):
    path = os.path.join(path, "model.safetensors")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  try:
    from safetensors.numpy import load_file
  except ImportError as e:  # pragma: no cover - depends on the install
    raise CheckpointError("reading .safetensors files needs the safetensors package: "
                          "pip install safetensors") from e
  try:
    raw = load_file(path)
  except Exception as e:
    raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from None
  sd = hf_to_sam_state_dict(raw, path)
  cfg = infer_config(sd, path)
  heads = _hf_decoder_heads(path)
  if heads is not None:
    cfg = dataclasses.replace(cfg, decoder_num_heads=heads)
  sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
  return convert_state_dict(sd, cfg, path)


def load_any(checkpoint: str):
  """(SamConfig, params) from a converted directory, a `.pth` (needs PyTorch) or a Hugging
  Face `model.safetensors` / folder holding one."""
  checkpoint = os.fspath(checkpoint)
  if os.path.isdir(checkpoint):
    if os.path.isfile(os.path.join(checkpoint, META_FILE)):
      return load_sam_checkpoint(checkpoint)
    if os.path.isfile(os.path.join(checkpoint, "model.safetensors")):
      return load_hf_safetensors(checkpoint)
    raise CheckpointError(f"{checkpoint}: neither a converted SAM checkpoint ({META_FILE}) "
                          "nor a Hugging Face folder (model.safetensors)")
  if checkpoint.endswith(".safetensors"):
    return load_hf_safetensors(checkpoint)
  sd = load_torch_state_dict(checkpoint)
  return convert_state_dict(sd, None, checkpoint)
