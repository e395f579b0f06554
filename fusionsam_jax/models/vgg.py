"""VGG16 feature network Phi of Eq. 7 and an LPIPS-style perceptual distance.

The feature network is the 13 conv layers of torchvision's ``vgg16().features`` (ImageNet
weights). Those weights cannot be downloaded here: the user converts a torchvision VGG16
state dict once with ``tools/convert_vgg16.py`` and ``load_vgg16_params`` is the only way to
obtain params. ``PerceptualLoss`` requires them; there is no random-init path to a loss.

Perceptual distance (per image), as LPIPS computes it but WITHOUT LPIPS's learned linear
layers (their weights are not available; this is LPIPS with all channel weights = 1, the
"baseline" variant of Zhang et al. 2018):

    d(x, y) = sum_l mean_{h,w} sum_c (f_l(x) / ||f_l(x)||_c - f_l(y) / ||f_l(y)||_c)^2

over l in relu1_2, relu2_2, relu3_3, relu4_3, relu5_3. Inputs are images in [0, 1];
1-channel images (thermal / depth) are repeated to 3 channels; then ImageNet mean/std
normalisation.

Param tree (``VGG16Features`` params): ``conv1_1`` ... ``conv5_3``, each ``kernel``
(3, 3, in, out) HWIO and ``bias`` (out,).
"""

from __future__ import annotations

import os
import zipfile
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from fusionsam_jax.fsutil import atomic_file
from fusionsam_jax.models.sam.checkpoint import CheckpointError, tensor_to_numpy

Array = jax.Array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (name, out channels) per stage; a 2x2 max pool separates stages.
VGG16_STAGES: tuple[tuple[tuple[str, int], ...], ...] = (
    (("conv1_1", 64), ("conv1_2", 64)),
    (("conv2_1", 128), ("conv2_2", 128)),
    (("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256)),
    (("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512)),
    (("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512)),
)
FEATURE_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")


def _torch_layout() -> list[tuple[str, int, int, int]]:
  """[(flax name, torchvision features index, in_ch, out_ch)] for the 13 convs."""
  out, idx, in_ch = [], 0, 3
  for stage in VGG16_STAGES:
    for name, ch in stage:
      out.append((name, idx, in_ch, ch))
      idx += 2          # Conv2d, ReLU
      in_ch = ch
    idx += 1              # MaxPool2d
  return out


VGG16_TORCH_LAYOUT = _torch_layout()   # conv indices 0, 2, 5, 7, 10, 12, 14, 17, ..., 28
FORMAT_TAG = "fusionsam_jax.vgg16.v1"


def expected_param_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
  return {name: {"kernel": (3, 3, i, o), "bias": (o,)} for name, _, i, o in VGG16_TORCH_LAYOUT}


class VGG16Features(nn.Module):
  """x (B, H, W, 1|3) in [0, 1] -> dict of the five ReLU feature maps (channels-last)."""

  @nn.compact
  def __call__(self, x: Array) -> dict[str, Array]:
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
      raise ValueError(f"VGG16 expects 1 or 3 channels, got {x.shape}")
    mean = jnp.asarray(IMAGENET_MEAN, x.dtype)
    std = jnp.asarray(IMAGENET_STD, x.dtype)
    h = (x - mean) / std
    feats = {}
    for s, stage in enumerate(VGG16_STAGES):
      if s > 0:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
      for name, ch in stage:
        h = nn.relu(nn.Conv(ch, (3, 3), padding=1, name=name)(h))
      feats[FEATURE_LAYERS[s]] = h
    return feats


def params_from_torch_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
  """torchvision VGG16 state dict (numpy values) -> Flax params of ``VGG16Features``.

  Accepts ``features.{i}.weight/bias`` keys (a full ``vgg16`` state dict; ``classifier.*``
  and anything else is ignored). Conv weights OIHW -> HWIO. Raises ValueError listing the
  missing keys, or naming the key, expected and found shape on a mismatch.
  """
  missing = []
  for name, i, _, _ in VGG16_TORCH_LAYOUT:
    for part in ("weight", "bias"):
      if f"features.{i}.{part}" not in state_dict:
        missing.append(f"features.{i}.{part}")
  if missing:
    raise ValueError("VGG16 state dict is missing keys: " + ", ".join(missing))
  params = {}
  for name, i, cin, cout in VGG16_TORCH_LAYOUT:
    w = np.asarray(state_dict[f"features.{i}.weight"])
    b = np.asarray(state_dict[f"features.{i}.bias"])
    for key, arr, exp in ((f"features.{i}.weight", w, (cout, cin, 3, 3)),
                          (f"features.{i}.bias", b, (cout,))):
      if tuple(arr.shape) != exp:
        raise ValueError(f"shape mismatch for {key}: expected {exp}, "
                         f"found {tuple(arr.shape)}")
    params[name] = {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0), np.float32),
                    "bias": b.astype(np.float32)}
  return params


def save_vgg16_params(params: Mapping, path: str) -> None:
  """Write params to ``path`` as .npz atomically (temp file in the same folder + rename)."""
  _validate_params(params, "params")
  flat = {f"{n}/{p}": np.asarray(params[n][p], np.float32)
          for n in expected_param_shapes() for p in ("kernel", "bias")}
  flat["__format__"] = np.asarray(FORMAT_TAG)
  with atomic_file(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **flat)


def _validate_params(params: Mapping, where: str) -> None:
  for name, shapes in expected_param_shapes().items():
    if name not in params:
      raise ValueError(f"{where}: missing VGG16 layer {name!r}")
    for p, exp in shapes.items():
      if p not in params[name]:
        raise ValueError(f"{where}: missing {name}/{p}")
      found = tuple(np.shape(params[name][p]))
      if found != exp:
        raise ValueError(f"{where}: shape mismatch for {name}/{p}: expected {exp}, "
                         f"found {found}")


def load_vgg16_params(path: str) -> dict:
  """Load converted VGG16 params (``tools/convert_vgg16.py`` output).

  Returns the ``VGG16Features`` params tree (use as ``{"params": tree}``). Raises
  FileNotFoundError if ``path`` does not exist, ValueError if it is not a converted VGG16
  file or has missing / mis-shaped arrays.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"VGG16 params file not found: {path}")
  try:
    with np.load(path, allow_pickle=False) as z:
      data = {k: z[k] for k in z.files}
  except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f"{path} is not a converted VGG16 .npz file ({e})") from None
  if "__format__" not in data or str(data["__format__"]) != FORMAT_TAG:
    raise ValueError(f"{path} is not a converted VGG16 file (no {FORMAT_TAG!r} tag); "
                     f"convert the torchvision state dict with tools/convert_vgg16.py")
  params: dict = {}
  for key, arr in data.items():
    if key == "__format__":
      continue
    name, _, p = key.partition("/")
    params.setdefault(name, {})[p] = arr
  _validate_params(params, path)
  return {n: {p: jnp.asarray(params[n][p]) for p in ("kernel", "bias")}
          for n in expected_param_shapes()}


def _channel_normalize(f: Array, eps: float = 1e-10) -> Array:
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


def perceptual_distance(params: Mapping, x: Array, y: Array) -> Array:
  """LPIPS-style distance (no learned weights) between image batches -> (B,).

  ``params`` is the tree from ``load_vgg16_params``; VGG weights are frozen
  (stop_gradient); gradients flow to ``x`` and ``y``.
  """
  if x.shape != y.shape:
    raise ValueError(f"perceptual_distance: shapes differ {x.shape} vs {y.shape}")
  params = jax.lax.stop_gradient(params)
  net = VGG16Features()
  b = x.shape[0]
  feats = net.apply({"params": params}, jnp.concatenate([x, y], axis=0))
  total = jnp.zeros((b,), jnp.float32)
  for layer in FEATURE_LAYERS:
    f = _channel_normalize(feats[layer])
    d = jnp.sum(jnp.square(f[:b] - f[b:]), axis=-1)        # (B, h_l, w_l)
    total = total + jnp.mean(d, axis=(1, 2))
  return total


@jax.tree_util.register_pytree_node_class
class PerceptualLoss:
  """Eq. 7's Phi-distance with loaded VGG16 weights; a pytree, so pass it into ``jit``.

      loss_fn = PerceptualLoss.from_file("ckpt/vgg16.npz")   # or PerceptualLoss(params)
      d = loss_fn(x, x_hat)                                   # (B,)

  There is deliberately no constructor without params.
  """

  def __init__(self, params: Mapping):
    if params is None:
      raise ValueError("PerceptualLoss needs VGG16 params from load_vgg16_params(); "
                       "it never runs on random features")
    _validate_params(params, "PerceptualLoss params")
    self.params = params

  @classmethod
  def from_file(cls, path: str) -> "PerceptualLoss":
    return cls(load_vgg16_params(path))

  def __call__(self, x: Array, y: Array) -> Array:
    return perceptual_distance(self.params, x, y)

  def tree_flatten(self):
    return (self.params,), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    obj.params = children[0]
    return obj


def read_torch_state_dict(path: str) -> dict:
  """Load ``path`` with torch (weights only) -> {key: float32 numpy array}. Raises."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  try:
    import torch
  except ImportError:
    raise RuntimeError("PyTorch is needed to read .pth files: pip install torch "
                       "(the 'convert' extra)") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for bad / truncated files
    full = str(e)
    msg = full.splitlines()[0] if full else type(e).__name__
    if "Weights only load failed" in msg and "GLOBAL" in full:
      msg = "not a plain tensor checkpoint; refusing to unpickle arbitrary objects"
    elif "Weights only load failed" in msg:
      msg = "unpickling failed: not a PyTorch file"
    elif len(msg) > 160:
      msg = msg[:157] + "..."
    raise ValueError(f"{path} is not a readable PyTorch checkpoint ({msg})") from None
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
    raise ValueError(f"{path} does not hold a state dict of tensors "
                     f"(found {type(obj).__name__})")
  sd = {}
  for k, v in obj.items():
    if isinstance(k, str) and k.startswith("features."):
      try:   # NaN / Inf, int / bool / complex, sparse, empty: refused naming the key
        sd[k] = tensor_to_numpy(torch, path, k, v)
      except CheckpointError as e:
        raise ValueError(str(e)) from None
  if not sd:
    raise ValueError(f"{path} has no 'features.*' tensors: not a torchvision VGG16 "
                     f"state dict (first keys: {', '.join(list(obj)[:3])})")
  return sd
