"""`SamPredictor`: the official `segment_anything.SamPredictor` API on the Flax port.

  sam = sam_model_registry["vit_h"](checkpoint="sam_vit_h_4b8939.pth")
  predictor = SamPredictor(sam)
  predictor.set_image(image)                     # uint8 (H, W, 3), RGB
  masks, scores, logits = predictor.predict(point_coords=np.array([[500, 375]]),
                                            point_labels=np.array([1]))

Outputs are numpy arrays shaped as the official ones: masks (C, H, W), iou_predictions
(C,), low_res_logits (C, 256, 256), for a box (4,) or (1, 4) too; several boxes (B, 4), B > 1
(an error in the official `predict`), give (B, C, H, W), (B, C), (B, C, 256, 256) as
`predict_torch` does. `predict_torch` and `sam(batched_input, multimask_output)` return
torch tensors when given torch tensors, as the official ones. `get_image_embedding()` is (1, 256, 64, 64) like
SAM's (`embedding_layout="NHWC"` gives channels-last, the layout the model computes in).

No recompilation in interactive use. The compiled shapes never depend on the number of
points, the image size or the prompt kind:
- points are padded to a bucket (16, 32, 64, ...) with SAM's padding label -1, and padding
  tokens are masked out of the decoder's attention, so the result equals SAM's on the
  unpadded prompts (SAM's own pad point, added when there is no box, is kept);
- points, boxes and mask inputs always travel together with validity flags, so points-only,
  box-only and mixed prompts share one program;
- the image is resized on the host and zero-padded into the fixed img_size canvas;
  `postprocess_masks` upsamples to that canvas and resizes the input-size crop to the
  original size by gathering with precomputed taps, into an output padded to a size bucket
  (256, 512, 768, 1024, 1536, ...). Only the final crop to (H, W), done in numpy, depends
  on the exact size;
- prompt batches are padded to 4, 8, 16, ... prompts.
So a new program is compiled once per (output size bucket, prompt-batch bucket,
point bucket, multimask_output, return_logits), and once per image-batch bucket for the
encoder.
"""

from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from fusionsam_jax.models.sam.checkpoint import load_any
from fusionsam_jax.models.sam.sam import (PIXEL_MEAN, PIXEL_STD, JaxDevice, LoadedSam, Sam,
                                          SamConfig)
from fusionsam_jax.models.sam.transforms import (ResizeLongestSide, bilinear_taps, is_torch,
                                                 like, postprocess_masks_padded, size_bucket,
                                                 to_numpy)


def _pow2_bucket(n: int, minimum: int) -> int:
  b = minimum
  while b < n:
    b *= 2
  return b


def _encode_impl(module, params, canvas, input_sizes):
  """uint8 (N, S, S, 3) canvases with the resized image top-left -> (N, h, w, C)."""
  s = canvas.shape[1]
  x = (canvas.astype(jnp.float32) - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)
  rows = jnp.arange(s)[None, :, None] < input_sizes[:, 0, None, None]
  cols = jnp.arange(s)[None, None, :] < input_sizes[:, 1, None, None]
  x = jnp.where((rows & cols)[..., None], x, 0.0)  # SAM pads after normalising
  return module.apply({"params": params}, x, method=Sam.encode)


class SamPredictor:
  """Computes image embeddings once, then answers prompts quickly."""

  mask_threshold = 0.0

  def __init__(self, sam_model: Union[LoadedSam, SamConfig], params=None,
               encoder_dtype=jnp.float32, attn_impl: str = "xla",
               embedding_layout: str = "NCHW", prompt_batch_min: int = 4,
               point_bucket_min: int = 16):
    """`SamPredictor(sam)` with what `sam_model_registry` returns, or
    `SamPredictor(config, params)`.

    embedding_layout: "NCHW" (SAM's, default) or "NHWC" for `get_image_embedding`.
    prompt_batch_min / point_bucket_min: the smallest prompt-batch and point buckets.
    """
    if isinstance(sam_model, LoadedSam):
      if params is not None:
        raise ValueError("pass either a LoadedSam or (config, params), not both")
      config, params = sam_model.config, sam_model.params
      encoder_dtype, attn_impl = sam_model.encoder_dtype, sam_model.attn_impl
    else:
      config = sam_model
      if params is None:
        raise ValueError("SamPredictor(config, params): params missing")
      sam_model = LoadedSam(config, params, encoder_dtype, attn_impl)
    if embedding_layout not in ("NCHW", "NHWC"):
      raise ValueError(f"embedding_layout must be 'NCHW' or 'NHWC', got {embedding_layout!r}")
    self.config = config
    self.params = params
    self.model = sam_model   # the official `predictor.model`
    self.module = Sam(config, encoder_dtype=encoder_dtype, attn_impl=attn_impl)
    self.transform = ResizeLongestSide(config.img_size)
    self.embedding_layout = embedding_layout
    self.prompt_batch_min = prompt_batch_min
    self.point_bucket_min = point_bucket_min
    self._encode = jax.jit(lambda p, x, sizes: _encode_impl(self.module, p, x, sizes))
    self._decode = jax.jit(self._decode_impl,
                           static_argnames=("multimask_output", "return_logits"))
    self.reset_image()

  @classmethod
  def from_checkpoint(cls, checkpoint: str, **kwargs) -> "SamPredictor":
    """A converted directory, an official .pth or a Hugging Face model.safetensors."""
    config, params = load_any(checkpoint)
    return cls(config, params, **kwargs)

  @property
  def device(self) -> JaxDevice:
    return JaxDevice()

  # ---- images ---------------------------------------------------------------------------

  def reset_image(self):
    self.features = None  # (N, h, w, C) channels-last
    self.is_image_set = False
    self.original_sizes = []
    self.input_sizes = []
    self.original_size: Optional[Tuple[int, int]] = None
    self.input_size: Optional[Tuple[int, int]] = None

  def set_image(self, image, image_format: str = "RGB"):
    """Embeds one uint8 (H, W, 3) image, or a batch: a list of images of any sizes or a
    (N, H, W, 3) array. With a batch, pick the image per call with `image_index`."""
    if image_format not in ("RGB", "BGR"):
      raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    images = list(image) if (isinstance(image, (list, tuple))
                             or np.asarray(image).ndim == 4) else [image]
    if not images:
      raise ValueError("set_image: empty batch")
    resized, originals = [], []
    for im in images:
      im = np.asarray(im)
      if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
        raise ValueError(f"set_image expects uint8 HxWx3 images, got {im.dtype} {im.shape}")
      if image_format == "BGR":
        im = im[..., ::-1]
      resized.append(self.transform.apply_image(np.ascontiguousarray(im)))
      originals.append(tuple(im.shape[:2]))
    self._set_resized(resized, originals)

  def set_torch_image(self, transformed_image, original_image_size):
    """The official `set_torch_image`: an image already resized with ResizeLongestSide,
    (1, 3, h, w) or (h, w, 3) with pixel values 0-255, and its original (H, W)."""
    x = to_numpy(transformed_image)
    if x.ndim == 4 and x.shape[0] == 1 and x.shape[1] == 3:
      x = x[0].transpose(1, 2, 0)
    if x.ndim != 3 or x.shape[2] != 3 or max(x.shape[:2]) != self.config.img_size:
      raise ValueError(f"set_torch_image input must be 1x3xHxW (or HxWx3) with long side "
                       f"{self.config.img_size}, got {np.asarray(transformed_image).shape}")
    self._set_resized([x], [tuple(int(v) for v in original_image_size)])

  def _set_resized(self, resized, originals):
    s = self.config.img_size
    n = len(resized)
    nb = _pow2_bucket(n, 1)
    canvas = np.zeros((nb, s, s, 3), np.float32 if resized[0].dtype != np.uint8 else np.uint8)
    sizes = np.zeros((nb, 2), np.int32)
    for i, r in enumerate(resized):
      canvas[i, :r.shape[0], :r.shape[1]] = r
      sizes[i] = r.shape[:2]
    self.reset_image()
    self.features = self._encode(self.params, canvas, sizes)
    self.input_sizes = [tuple(int(v) for v in r.shape[:2]) for r in resized]
    self.original_sizes = list(originals)
    self.num_images = n
    self.original_size, self.input_size = self.original_sizes[0], self.input_sizes[0]
    self.is_image_set = True

  def get_image_embedding(self, image_index: Optional[int] = None):
    """The embeddings: (N, C, h, w) (SAM's layout; (N, h, w, C) with
    embedding_layout="NHWC"), N = number of images set, or one image's (1, ...)."""
    if not self.is_image_set:
      raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
    f = self.features[:self.num_images]
    if image_index is not None:
      f = self.features[image_index:image_index + 1]
    return f.transpose(0, 3, 1, 2) if self.embedding_layout == "NCHW" else f

  # ---- prompts --------------------------------------------------------------------------

  def _decode_impl(self, params, features, image_index, coords, labels, point_valid, boxes,
                   box_valid, masks, mask_valid, taps_y, taps_x, multimask_output,
                   return_logits):
    feats = jax.lax.dynamic_index_in_dim(features, image_index, 0, keepdims=True)
    low_res, iou = self.module.apply({"params": params}, feats, coords, labels, point_valid,
                                    boxes, box_valid, masks, mask_valid, multimask_output,
                                    method=Sam.decode_padded)
    out = postprocess_masks_padded(low_res, taps_y, taps_x, self.config.img_size)
    if not return_logits:
      out = out > self.mask_threshold
    return out, iou, low_res

  def _check_image(self, image_index):
    if not self.is_image_set:
      raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
    if not 0 <= image_index < self.num_images:
      raise IndexError(f"image_index {image_index} out of range ({self.num_images} images set)")

  def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
              multimask_output: bool = True, return_logits: bool = False,
              image_index: int = 0):
    """Prompts in original-image pixels (as the official predictor).

    point_coords (N, 2) xy, point_labels (N,), box (4,) or (1, 4) xyxy, mask_input
    (1, 256, 256) low-res logits from a previous call. Returns (masks (C, H, W), iou (C,),
    low_res (C, 256, 256)). Beyond the official API (which raises there): box (B, 4) with
    B > 1 runs B boxes in one call (the points, if any, go with every box) and returns
    (B, C, H, W), (B, C), (B, C, 256, 256). Malformed prompts raise a one-line ValueError.
    """
    self._check_image(image_index)
    orig = self.original_sizes[image_index]
    e4 = 4 * self.config.image_embedding_size
    coords = labels = boxes = masks = None
    batched = False
    if point_coords is not None:
      if point_labels is None:
        raise ValueError("point_labels must be supplied if point_coords is supplied.")
      pc, pl = to_numpy(point_coords, np.float32), to_numpy(point_labels)
      if pc.ndim != 2 or pc.shape[1] != 2:
        raise ValueError(f"point_coords: expected (N, 2) xy, got shape {pc.shape}")
      if pl.shape != pc.shape[:1]:
        raise ValueError(f"point_labels: expected shape ({pc.shape[0]},) (one label per "
                         f"point), got {pl.shape}")
      coords = self.transform.apply_coords(pc, orig)[None]
      labels = pl.astype(np.int32)[None]
    if box is not None:
      b = to_numpy(box, np.float32)
      if b.shape != (4,) and (b.ndim != 2 or b.shape[1] != 4):
        raise ValueError(f"box: expected (4,) or (1, 4) xyxy (or (B, 4) for B boxes), got "
                         f"shape {b.shape}")
      batched = b.ndim == 2 and b.shape[0] > 1
      boxes = self.transform.apply_boxes(b, orig).reshape(-1, 4)
    if mask_input is not None:
      m = to_numpy(mask_input, np.float32)
      if m.shape != (1, e4, e4):
        raise ValueError(f"mask_input: expected (1, {e4}, {e4}) low-res logits, got shape "
                         f"{m.shape}")
      masks = m[None]
    out = self._predict_prompts(coords, labels, boxes, masks, multimask_output,
                                return_logits, image_index)
    return out if batched else tuple(o[0] for o in out)

  def predict_torch(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                    multimask_output: bool = True, return_logits: bool = False,
                    image_index: int = 0):
    """Batched prompts already in the resized input frame (the official `predict_torch`).

    point_coords (B, N, 2), point_labels (B, N) (-1 marks padding), boxes (B, 4), mask_input
    (B, 1, 256, 256), as numpy, JAX or torch arrays; a batch of 1 broadcasts against the
    others. Returns (B, C, H, W) masks, (B, C) iou, (B, C, 256, 256) low-res logits: torch
    tensors when a prompt was one (as the official method), numpy otherwise.
    """
    given = [a for a in (point_coords, point_labels, boxes, mask_input) if a is not None]
    e4 = 4 * self.config.image_embedding_size
    pc = pl = bx = m = None
    if point_coords is not None:
      if point_labels is None:
        raise ValueError("point_labels must be supplied if point_coords is supplied.")
      pc, pl = to_numpy(point_coords, np.float32), to_numpy(point_labels)
      if pc.ndim != 3 or pc.shape[2] != 2:
        raise ValueError(f"point_coords: expected (B, N, 2) xy, got shape {pc.shape}")
      if pl.shape != pc.shape[:2]:
        raise ValueError(f"point_labels: expected shape {pc.shape[:2]} (one label per "
                         f"point), got {pl.shape}")
    if boxes is not None:
      bx = to_numpy(boxes, np.float32)
      if bx.ndim == 3 and bx.shape[1] == 1:  # (B, 1, 4), as the official forward accepts
        bx = bx[:, 0]
      if bx.ndim != 2 or bx.shape[1] != 4:
        raise ValueError(f"boxes: expected (B, 4) xyxy, got shape {bx.shape}")
    if mask_input is not None:
      m = to_numpy(mask_input, np.float32)
      if m.ndim != 4 or m.shape[1:] != (1, e4, e4):
        raise ValueError(f"mask_input: expected (B, 1, {e4}, {e4}) low-res logits, got "
                         f"shape {m.shape}")
    out = self._predict_prompts(pc, pl, bx, m, multimask_output, return_logits, image_index)
    ref = next((a for a in given if is_torch(a)), None)
    return tuple(like(o, ref) for o in out)

  def _predict_prompts(self, point_coords, point_labels, boxes, mask_input,
                       multimask_output, return_logits, image_index):
    """Checked numpy prompts in the input frame -> numpy (B, C, H, W), (B, C), (B, C, h, w)."""
    self._check_image(image_index)
    n_b = [a.shape[0] for a in (point_coords, boxes, mask_input) if a is not None]
    b = max(n_b) if n_b else 1
    if any(n not in (1, b) for n in n_b):
      raise ValueError(f"prompt batch sizes {n_b} (points, boxes, masks) do not broadcast")
    bb = _pow2_bucket(b, self.prompt_batch_min)
    e4 = 4 * self.config.image_embedding_size
    has_box = boxes is not None
    n_pts = 0 if point_coords is None else point_coords.shape[1]
    # SAM appends one padding point (label -1) when there is no box: a real token.
    n_tok = n_pts + (1 if (point_coords is not None and not has_box) else 0)
    nb = _pow2_bucket(max(n_tok, 1), self.point_bucket_min)
    coords = np.zeros((bb, nb, 2), np.float32)
    labels = np.full((bb, nb), -1, np.int32)
    point_valid = np.zeros((bb, nb), bool)
    if point_coords is not None:
      coords[:b, :n_pts] = point_coords
      labels[:b, :n_pts] = point_labels
      point_valid[:b, :n_tok] = True
    box_arr = np.zeros((bb, 4), np.float32)
    box_valid = np.zeros((bb,), bool)
    if has_box:
      box_arr[:b] = boxes
      box_valid[:b] = True
    mask_arr = np.zeros((bb, e4, e4, 1), np.float32)
    mask_valid = np.zeros((bb,), bool)
    if mask_input is not None:
      mask_arr[:b] = mask_input.transpose(0, 2, 3, 1)
      mask_valid[:b] = True
    (h, w), (oh, ow) = self.input_sizes[image_index], self.original_sizes[image_index]
    taps_y = bilinear_taps(h, oh, size_bucket(oh))
    taps_x = bilinear_taps(w, ow, size_bucket(ow))
    out, iou, low = self._decode(self.params, self.features, np.int32(image_index), coords,
                                 labels, point_valid, box_arr, box_valid, mask_arr,
                                 mask_valid, taps_y, taps_x,
                                 multimask_output=bool(multimask_output),
                                 return_logits=bool(return_logits))
    out, iou, low = np.asarray(out), np.asarray(iou), np.asarray(low)
    return out[:b, :, :oh, :ow], iou[:b], low[:b]

  def forward_batched(self, batched_input, multimask_output: bool):
    """The official `Sam.forward` (what `sam(batched_input, multimask_output)` runs): every
    record's image embedded in one batch, then its prompts decoded. See `LoadedSam.__call__`."""
    if not isinstance(batched_input, (list, tuple)) or not batched_input:
      raise ValueError("batched_input: expected a non-empty list of dicts with 'image' and "
                       "'original_size'")
    images, originals = [], []
    for i, rec in enumerate(batched_input):
      if "image" not in rec or "original_size" not in rec:
        raise ValueError(f"batched_input[{i}]: needs 'image' (3, H, W) and 'original_size'")
      x = to_numpy(rec["image"])
      x = x if x.dtype == np.uint8 else x.astype(np.float32)
      if x.ndim != 3 or x.shape[0] != 3 or max(x.shape[1:]) != self.config.img_size:
        raise ValueError(f"batched_input[{i}]['image']: expected (3, H, W) with long side "
                         f"{self.config.img_size}, got shape {x.shape}")
      images.append(x.transpose(1, 2, 0))
      originals.append(tuple(int(v) for v in rec["original_size"]))
    self._set_resized(images, originals)
    outputs = []
    for i, rec in enumerate(batched_input):
      masks, iou, low = self.predict_torch(rec.get("point_coords"), rec.get("point_labels"),
                                           rec.get("boxes"), rec.get("mask_inputs"),
                                           multimask_output, image_index=i)
      masks, iou, low = (like(to_numpy(a), rec["image"]) for a in (masks, iou, low))
      outputs.append({"masks": masks, "iou_predictions": iou, "low_res_logits": low})
    return outputs

  def predict_batch(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                    multimask_output: bool = True, return_logits: bool = False):
    """Older name of `predict_torch`, mask_input channels-last (B, 256, 256, 1)."""
    if mask_input is not None:
      mask_input = np.asarray(mask_input).transpose(0, 3, 1, 2)
    return self.predict_torch(point_coords, point_labels, boxes, mask_input,
                              multimask_output, return_logits)
