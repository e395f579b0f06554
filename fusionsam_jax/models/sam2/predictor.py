"""`SAM2ImagePredictor`: the API of `sam2.sam2_image_predictor.SAM2ImagePredictor` on the Flax
SAM 2 port.

  sam2_model = build_sam2("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt")
  predictor = SAM2ImagePredictor(sam2_model)    # or SAM2ImagePredictor.from_pretrained(dir)
  predictor.set_image(image)                    # uint8 (H, W, 3) RGB, or a PIL image
  masks, scores, low_res = predictor.predict(point_coords=np.array([[500, 375]]),
                                             point_labels=np.array([1]))

As in `sam2`: the image is resized to image_size x image_size (bilinear, antialiased, no
aspect-preserving padding) and normalised with the ImageNet mean / std; prompts are in
original-image pixels (`normalize_coords=True`) or in [0, 1] (False); a box is given to the
prompt encoder as two corner points with labels 2 and 3 ahead of the clicks; outputs are
numpy float32 arrays, masks (C, H, W) (0 / 1 unless return_logits), scores (C,), low-res
logits (C, 256, 256) clamped to [-32, 32]. With several boxes (B, 4) the outputs gain a
leading B. `get_image_embedding()` is (1, 256, 64, 64) and `_features` is the official dict
{"image_embed": (1, 256, 64, 64), "high_res_feats": [(1, 32, 256, 256), (1, 64, 128, 128)]}
(JAX arrays, channels-first). `Sam2ImagePredictor`, the older name, returns the embedding
channels-last (1, 64, 64, 256) (`embedding_layout`).

Compiled shapes do not depend on the prompts or the image size:
- the image is resized on the host (numpy, the same separable matrices) into the fixed
  image_size canvas, so the encoder compiles once (per image-batch size);
- points, box corners and the mask input always travel together: the corners and clicks are
  padded to a token bucket (`point_bucket_min`, 32 by default: 16 clicks and a box) with
  tokens that are masked out of attention, and a missing mask input is a zero mask with a
  validity flag, so every prompt kind shares one decoder program (per `multimask_output`);
- several prompts (boxes, point sets) run `prompt_batch` at a time through that program;
- the upsampling to the original size is one small program per image size, run per mask.
So after the first predict on one image, a new click count (up to 16 with a box, 31
without), box count or mask input compiles nothing, and a new image size compiles one
program (the upsampling). Results equal those of the unpadded prompt to float rounding
(padding tokens get exactly zero attention weight).
"""

import functools
from typing import List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image as PILImage
from scipy import ndimage

from fusionsam_jax.models.sam2.build import build_sam2_hf
from fusionsam_jax.models.sam2.checkpoint import load_sam2_any
from fusionsam_jax.models.sam2.interp import bilinear_aa_matrix, bilinear_matrix, resize_2d
from fusionsam_jax.models.sam.sam import JaxDevice
from fusionsam_jax.models.sam2.sam2 import (PIXEL_MEAN, PIXEL_STD, LoadedSam2, Sam2,
                                            Sam2Config, Sam2Features, decode_padded)

PAD_LABEL = -10  # bucket padding (masked out); sam2's own -1 padding point stays a real token


def _bucket(n: int, minimum: int = 1) -> int:
  b = minimum
  while b < n:
    b *= 2
  return b


def _remove_small_regions(logits: np.ndarray, threshold: float, max_hole_area: float,
                          max_sprinkle_area: float) -> np.ndarray:
  """`SAM2Transforms.postprocess_masks`' hole filling / sprinkle removal on low-res logits
  (B, M, h, w): background components of at most max_hole_area pixels are set to
  threshold + 10, foreground ones of at most max_sprinkle_area to threshold - 10
  (8-connected components, as sam2's `get_connected_components`)."""
  out = np.array(logits, np.float32)
  eight = np.ones((3, 3), bool)
  for idx in np.ndindex(*out.shape[:-2]):
    m = out[idx]
    for area, region, value in ((max_hole_area, m <= threshold, threshold + 10.0),
                                (max_sprinkle_area, m > threshold, threshold - 10.0)):
      if area > 0:
        lab, n = ndimage.label(region, structure=eight)
        if n:
          sizes = np.bincount(lab.ravel())
          small = (sizes <= area)
          small[0] = False
          m = np.where(small[lab], value, m)
    out[idx] = m
  return out


class Sam2ImagePredictor:
  """Computes the image features once, then answers prompts quickly."""

  default_layout = "NHWC"

  def __init__(self, sam_model: Union[LoadedSam2, Sam2Config], params=None,
               mask_threshold: float = 0.0, max_hole_area: float = 0.0,
               max_sprinkle_area: float = 0.0, encoder_dtype=jnp.float32,
               attn_impl: str = "xla", compiler_options: Optional[dict] = None,
               embedding_layout: Optional[str] = None, prompt_batch: int = 1,
               point_bucket_min: int = 32, **kwargs):
    """`SAM2ImagePredictor(sam2_model)` with what `build_sam2` returns, or
    `Sam2ImagePredictor(config, params)`.

    `encoder_dtype=jnp.bfloat16, attn_impl="auto"` is the GPU fast path (cuDNN flash
    attention for the long sequences, XLA for Hiera's small windows; "cudnn" everywhere was
    5% slower on an H200: benchmarks/results/sam2_encoder_attn_h200.json);
    `compiler_options` go to every `jax.jit` (e.g. {"xla_backend_optimization_level": 0}
    for quicker compiles on CPU). embedding_layout: "NCHW" (sam2's) or "NHWC" for
    `get_image_embedding`. prompt_batch: prompts per decoder call; point_bucket_min: the
    smallest token bucket (box corners + clicks). Other keyword arguments (those
    `from_pretrained` passes on to the builder) are ignored, as in sam2.
    """
    if isinstance(sam_model, LoadedSam2):
      if params is not None:
        raise ValueError("pass either a LoadedSam2 or (config, params), not both")
      config, params = sam_model.config, sam_model.params
      encoder_dtype, attn_impl = sam_model.encoder_dtype, sam_model.attn_impl
    else:
      config = sam_model
      if params is None:
        raise ValueError("Sam2ImagePredictor(config, params): params missing")
    layout = embedding_layout or self.default_layout
    if layout not in ("NCHW", "NHWC"):
      raise ValueError(f"embedding_layout must be 'NCHW' or 'NHWC', got {layout!r}")
    if prompt_batch < 1 or point_bucket_min < 1:
      raise ValueError("prompt_batch and point_bucket_min must be >= 1")
    jit = functools.partial(jax.jit, compiler_options=compiler_options)
    self.config = config
    self.params = params
    self.mask_threshold = mask_threshold
    self.max_hole_area = max_hole_area
    self.max_sprinkle_area = max_sprinkle_area
    self.embedding_layout = layout
    self.prompt_batch = prompt_batch
    self.point_bucket_min = point_bucket_min
    self.model = sam_model if isinstance(sam_model, LoadedSam2) else LoadedSam2(
        config, params, encoder_dtype, attn_impl)
    self.module = Sam2(config, dtype=encoder_dtype, attn_impl=attn_impl)
    self._encode = jit(self._encode_impl)
    self._decode = jit(self._decode_impl, static_argnames=("multimask_output",))
    self._upsample = jit(self._upsample_impl, static_argnames=("orig_hw",))
    self._bb_feat_sizes = [(s, s) for s in (4 * config.image_embedding_size,
                                            2 * config.image_embedding_size,
                                            config.image_embedding_size)]
    self.reset_predictor()

  @classmethod
  def from_checkpoint(cls, ckpt: str, **kwargs) -> "Sam2ImagePredictor":
    """A directory written by tools/convert_sam2_weights.py, an official `.pt` or a folder
    holding one."""
    config, params = load_sam2_any(ckpt)
    return cls(config, params, **kwargs)

  @classmethod
  def from_pretrained(cls, model_id: str, **kwargs) -> "Sam2ImagePredictor":
    """sam2's `from_pretrained`: a local folder (a download of a `facebook/sam2*` Hugging
    Face repository, or a converted directory) or a Hugging Face id (`build_sam2_hf`)."""
    return cls(build_sam2_hf(model_id, **kwargs), **kwargs)

  def reset_predictor(self):
    self._feats: Optional[Sam2Features] = None
    self._orig_hw: Optional[List[Tuple[int, int]]] = None
    self._is_image_set = False
    self._is_batch = False

  @property
  def device(self) -> JaxDevice:
    """"cpu" (prompts are host arrays), with the JAX device in `jax_device`."""
    return JaxDevice()

  # -- images --------------------------------------------------------------------------------

  def _encode_impl(self, params, x):
    return self.module.apply({"params": params}, x, method=Sam2.encode)

  def _preprocess(self, image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> (S, S, 3) normalised, resized on the host (sam2's transform)."""
    s = self.config.image_size
    h, w = image.shape[:2]
    x = image.astype(np.float32) / np.float32(255.0)
    x = np.einsum("oh,hwc->owc", bilinear_aa_matrix(s, h), x)
    x = np.einsum("pw,owc->opc", bilinear_aa_matrix(s, w), x)
    return ((x - np.float32(PIXEL_MEAN)) / np.float32(PIXEL_STD)).astype(np.float32)

  @staticmethod
  def _as_array(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):
      if isinstance(image, PILImage.Image):
        image = np.asarray(image.convert("RGB"))
      else:
        raise ValueError(f"image: expected a numpy HxWx3 image or a PIL image, got "
                         f"{type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
      raise ValueError(f"image: expected an HxWx3 RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
      raise ValueError(f"image: expected uint8 pixels in [0, 255], got {image.dtype}")
    return image

  def set_image(self, image):
    """Computes the features of one RGB image (uint8 numpy HxWx3 or PIL)."""
    self.reset_predictor()
    image = self._as_array(image)
    self._feats = self._encode(self.params, self._preprocess(image)[None])
    self._orig_hw = [tuple(image.shape[:2])]
    self._is_image_set = True

  def set_image_batch(self, image_list: Sequence[np.ndarray]):
    """Computes the features of several RGB images (for `predict_batch`)."""
    self.reset_predictor()
    if not isinstance(image_list, (list, tuple)) or not image_list:
      raise ValueError("image_list: expected a non-empty list of HxWx3 uint8 images")
    images = [self._as_array(im) for im in image_list]
    self._feats = self._encode(self.params, np.stack([self._preprocess(im) for im in images]))
    self._orig_hw = [tuple(im.shape[:2]) for im in images]
    self._is_image_set = True
    self._is_batch = True

  def get_image_embedding(self):
    """(B, C, h, w) image embedding (`no_mem_embed` added, as in sam2); (B, h, w, C) with
    embedding_layout="NHWC"."""
    if not self._is_image_set:
      raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
    e = self._feats.image_embed
    return e.transpose(0, 3, 1, 2) if self.embedding_layout == "NCHW" else e

  @property
  def features(self) -> Optional[Sam2Features]:
    """The features channels-last, as the model computes them."""
    return self._feats

  @property
  def _features(self) -> Optional[dict]:
    """sam2's `_features` dict, channels-first: {"image_embed": (B, C, h, w),
    "high_res_feats": [(B, C/8, 4h, 4w), (B, C/4, 2h, 2w)]}."""
    if self._feats is None:
      return None
    nchw = lambda a: a.transpose(0, 3, 1, 2)
    return {"image_embed": nchw(self._feats.image_embed),
            "high_res_feats": [nchw(f) for f in self._feats.high_res_feats]}

  # -- prompts -------------------------------------------------------------------------------

  def _prep_prompts(self, point_coords, point_labels, box, mask_input, normalize_coords,
                    img_idx):
    """Prompts -> (coords (B, N, 2), labels (B, N), masks (B, 4h, 4w, 1) or None), B >= 1;
    coords in the image_size frame, box corners first. Raises ValueError on bad shapes."""
    s = self.config.image_size
    e4 = 4 * self.config.image_embedding_size
    h, w = self._orig_hw[img_idx]
    scale = np.array([s / w, s / h] if normalize_coords else [s, s], np.float32)
    coords = labels = masks = None
    if point_coords is not None:
      if point_labels is None:
        raise ValueError("point_labels must be supplied if point_coords is supplied.")
      coords = np.asarray(point_coords, np.float32)
      labels = np.asarray(point_labels)
      if coords.ndim not in (2, 3) or coords.shape[-1] != 2:
        raise ValueError(f"point_coords: expected (N, 2) or (B, N, 2) xy, got shape "
                         f"{coords.shape}")
      if labels.shape != coords.shape[:-1]:
        raise ValueError(f"point_labels: expected shape {coords.shape[:-1]} (one label per "
                         f"point of point_coords {coords.shape}), got {labels.shape}")
      if coords.ndim == 2:
        coords, labels = coords[None], labels[None]
      coords, labels = coords * scale, labels.astype(np.int32)
    if box is not None:
      b = np.asarray(box, np.float32)
      if b.shape[-1:] != (4,) or b.ndim > 2:
        raise ValueError(f"box: expected (4,) or (B, 4) xyxy, got shape {b.shape}")
      b = b.reshape(-1, 2, 2) * scale
      blab = np.broadcast_to(np.array([[2, 3]], np.int32), (b.shape[0], 2))
      if coords is not None:
        if coords.shape[0] != b.shape[0]:
          raise ValueError(f"box: {b.shape[0]} boxes but {coords.shape[0]} point sets "
                           "(point_coords (B, N, 2) with B boxes)")
        coords = np.concatenate([b, coords], 1)
        labels = np.concatenate([blab, labels], 1)
      else:
        coords, labels = b, np.array(blab)
    if mask_input is not None:
      masks = np.asarray(mask_input, np.float32)
      if masks.ndim == 3:
        masks = masks[None]
      if masks.ndim != 4 or masks.shape[1:] != (1, e4, e4):
        raise ValueError(f"mask_input: expected (1, {e4}, {e4}) or (B, 1, {e4}, {e4}) low-res "
                         f"logits, got shape {np.shape(mask_input)}")
      masks = masks.transpose(0, 2, 3, 1)
    nb = [a.shape[0] for a in (coords, masks) if a is not None]
    if len(nb) == 2 and nb[0] != nb[1] and 1 not in nb:
      raise ValueError(f"mask_input: {nb[1]} masks for {nb[0]} prompts")
    return coords, labels, masks

  def _decode_impl(self, params, features, image_index, coords, labels, token_mask, masks,
                   mask_valid, multimask_output):
    low_res, iou = self.module.apply({"params": params}, features, image_index, coords, labels,
                                     token_mask, masks, mask_valid, multimask_output,
                                     method=decode_padded)
    return low_res, iou, jnp.clip(low_res, -32.0, 32.0)

  @staticmethod
  def _upsample_impl(low_res, orig_hw):
    """One mask's low-res logits (h, w) -> logits at the original size."""
    return resize_2d(low_res, orig_hw, bilinear_matrix)

  def _low_res(self, point_coords, point_labels, box, mask_input, multimask_output,
               normalize_coords, img_idx):
    """Prompts as `predict` takes them -> numpy low-res logits (B, M, h, w), IoU (B, M) and
    the logits clamped to [-32, 32], B >= 1 (no upsampling, no hole filling)."""
    coords, labels, masks = self._prep_prompts(point_coords, point_labels, box, mask_input,
                                               normalize_coords, img_idx)
    e4 = 4 * self.config.image_embedding_size
    n_prompts = max([1] + [a.shape[0] for a in (coords, masks) if a is not None])
    n_tok = 0 if coords is None else coords.shape[1]
    nt = _bucket(max(n_tok, 1), self.point_bucket_min)
    pb = self.prompt_batch
    nbatch = -(-n_prompts // pb) * pb
    c = np.zeros((nbatch, nt, 2), np.float32)
    lab = np.full((nbatch, nt), PAD_LABEL, np.int32)
    if coords is not None:
      c[:n_prompts, :n_tok] = coords
      lab[:n_prompts, :n_tok] = labels
    # + the pad point the prompt encoder appends: a real token in sam2 when there are points
    # (box corners count as points), absent with a mask input alone.
    tok = np.concatenate([lab != PAD_LABEL, np.full((nbatch, 1), coords is not None)], 1)
    m = np.zeros((nbatch, e4, e4, 1), np.float32)
    mv = np.zeros((nbatch,), bool)
    if masks is not None:
      m[:n_prompts], mv[:n_prompts] = masks, True
    outs = []
    for i in range(0, n_prompts, pb):
      sl = slice(i, i + pb)
      outs.append(self._decode(self.params, self._feats, np.int32(img_idx), c[sl], lab[sl],
                               tok[sl], m[sl], mv[sl], multimask_output=bool(multimask_output)))
    low_res = np.concatenate([np.asarray(o[0]) for o in outs])[:n_prompts]
    iou = np.concatenate([np.asarray(o[1]) for o in outs])[:n_prompts].astype(np.float32)
    clamped = np.concatenate([np.asarray(o[2]) for o in outs])[:n_prompts].astype(np.float32)
    return low_res, iou, clamped

  def _predict(self, point_coords, point_labels, box, mask_input, multimask_output,
               return_logits, normalize_coords, img_idx):
    low_res, iou, clamped = self._low_res(point_coords, point_labels, box, mask_input,
                                          multimask_output, normalize_coords, img_idx)
    orig_hw = tuple(int(v) for v in self._orig_hw[img_idx])
    if self.max_hole_area > 0 or self.max_sprinkle_area > 0:
      low_res = _remove_small_regions(low_res, self.mask_threshold, self.max_hole_area,
                                      self.max_sprinkle_area)
    up = [self._upsample(low_res[b, k], orig_hw=orig_hw)
          for b in range(low_res.shape[0]) for k in range(low_res.shape[1])]
    full = np.stack([np.asarray(u, np.float32) for u in up]).reshape(
        low_res.shape[:2] + orig_hw)
    if not return_logits:
      full = (full > self.mask_threshold).astype(np.float32)
    out = (full, iou, clamped)
    return tuple(o.squeeze(0) if o.shape[0] == 1 else o for o in out)

  def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
              multimask_output: bool = True, return_logits: bool = False,
              normalize_coords: bool = True):
    """point_coords (N, 2) xy, point_labels (N,) 1 / 0, box (4,) or (B, 4) xyxy, mask_input
    (1, 256, 256) low-res logits from a previous call. -> (masks, scores, low_res_logits)."""
    if not self._is_image_set:
      raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
    return self._predict(point_coords, point_labels, box, mask_input, multimask_output,
                         return_logits, normalize_coords, 0)

  def predict_batch(self, point_coords_batch=None, point_labels_batch=None, box_batch=None,
                    mask_input_batch=None, multimask_output: bool = True,
                    return_logits: bool = False, normalize_coords: bool = True):
    """Per-image prompt lists after `set_image_batch`: -> lists of masks, scores, logits."""
    if not self._is_batch:
      raise RuntimeError("predict_batch needs images set with .set_image_batch(...)")
    outs = ([], [], [])
    for i in range(len(self._orig_hw)):
      pick = lambda lst: None if lst is None else lst[i]
      res = self._predict(pick(point_coords_batch), pick(point_labels_batch), pick(box_batch),
                          pick(mask_input_batch), multimask_output, return_logits,
                          normalize_coords, i)
      for acc, r in zip(outs, res):
        acc.append(r)
    return outs


class SAM2ImagePredictor(Sam2ImagePredictor):
  """sam2's name; `get_image_embedding()` channels-first (B, C, h, w) as in sam2."""

  default_layout = "NCHW"
