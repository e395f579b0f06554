"""SAM 2's prompt encoder, two-way transformer and mask decoder (ports of
`sam2.modeling.sam.{prompt_encoder,transformer,mask_decoder}`).

Differences from SAM 1 that matter here: point labels 2 and 3 (box corners given as points)
get their own embeddings; the transformer's MLP is `mlp/layers_{0,1}`; the decoder adds the
stride-4 and stride-8 backbone features (`conv_s0`, `conv_s1`) into its upscaling path,
predicts an object score from an extra token, can squash the IoU head with a sigmoid, and
with `dynamic_multimask_via_stability` picks the best multimask output when the single-mask
output is unstable.

Extra: `token_mask` (B, N) marks prompt tokens that are padding for a fixed shape (bucketed
point counts). Masked tokens are never attended to, so the real tokens' outputs are exactly
those of the unpadded prompt. (This is not `sam2`'s label -1 "not a point", which is a real
token.)
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from fusionsam_jax.models.sam import prompt_encoder as sam_prompt
from fusionsam_jax.models.sam import transformer as sam_transformer
from fusionsam_jax.models.sam.common import MLP
from fusionsam_jax.models.sam.mask_decoder import OutputUpscaling

Dtype = Any


class PromptEncoder(sam_prompt.PromptEncoder):
  """SAM's prompt encoder with SAM 2's point labels: points (B, N, 2) xy in the
  `input_image_size` frame with labels (B, N) in -1..3 (2 / 3: box corners given as points,
  with their own embeddings; < 0: "not a point"), boxes (B, 4), masks (B, 4h, 4w, 1) ->
  sparse (B, N', C) and dense (B, h, w, C) embeddings."""

  def _embed_points(self, points, labels, pad: bool):
    points = points.astype(jnp.float32) + 0.5
    labels = labels.astype(jnp.int32)
    if pad:
      points = jnp.concatenate([points, jnp.zeros((points.shape[0], 1, 2), points.dtype)], 1)
      labels = jnp.concatenate([labels, -jnp.ones((labels.shape[0], 1), labels.dtype)], 1)
    emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
    lab = labels[..., None]
    emb = jnp.where(lab < 0, self.not_a_point_embed.embedding[0], emb)
    for i in range(4):
      emb = emb + jnp.where(lab == i, self.point_embeddings[i].embedding[0], 0.0)
    return emb


class TwoWayTransformer(sam_transformer.TwoWayTransformer):
  """SAM 2's two-way transformer: SAM's, with SAM 2's MLP names (`sam2=True`)."""

  sam2: bool = True


class MaskDecoder(nn.Module):
  """SAM 2's mask decoder (image path: no object pointers)."""

  transformer_dim: int = 256
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  transformer_depth: int = 2
  transformer_num_heads: int = 8
  transformer_mlp_dim: int = 2048
  use_high_res_features: bool = True
  iou_prediction_use_sigmoid: bool = True
  pred_obj_scores: bool = True
  pred_obj_scores_mlp: bool = True
  dynamic_multimask_via_stability: bool = True
  dynamic_multimask_stability_delta: float = 0.05
  dynamic_multimask_stability_thresh: float = 0.98
  dtype: Dtype = jnp.float32

  def setup(self):
    d = self.transformer_dim
    self.num_mask_tokens = self.num_multimask_outputs + 1
    self.transformer = TwoWayTransformer(self.transformer_depth, d, self.transformer_num_heads,
                                         self.transformer_mlp_dim, dtype=self.dtype)
    self.iou_token = nn.Embed(1, d)
    self.mask_tokens = nn.Embed(self.num_mask_tokens, d)
    if self.pred_obj_scores:
      self.obj_score_token = nn.Embed(1, d)
    self.output_upscaling = OutputUpscaling(d, dtype=self.dtype)
    if self.use_high_res_features:
      self.conv_s0 = nn.Conv(d // 8, (1, 1), dtype=self.dtype)
      self.conv_s1 = nn.Conv(d // 4, (1, 1), dtype=self.dtype)
    self.output_hypernetworks_mlps = [
        MLP(d, d // 8, 3, dtype=self.dtype, name=f"output_hypernetworks_mlps_{i}")
        for i in range(self.num_mask_tokens)]
    self.iou_prediction_head = MLP(self.iou_head_hidden_dim, self.num_mask_tokens,
                                   self.iou_head_depth,
                                   sigmoid_output=self.iou_prediction_use_sigmoid,
                                   dtype=self.dtype)
    if self.pred_obj_scores:
      if self.pred_obj_scores_mlp:
        self.pred_obj_score_head = MLP(d, 1, 3, dtype=self.dtype)
      else:
        self.pred_obj_score_head = nn.Dense(1, dtype=self.dtype)

  def project_high_res(self, feat_s0, feat_s1):
    """Backbone levels 0 and 1 (B, 4h, 4w, C), (B, 2h, 2w, C) -> C/8 and C/4 channels."""
    return self.conv_s0(feat_s0), self.conv_s1(feat_s1)

  def __call__(self, image_embeddings, image_pe, sparse_prompt_embeddings,
               dense_prompt_embeddings, multimask_output: bool, repeat_image: bool,
               high_res_features: Optional[Sequence[Any]] = None, token_mask=None):
    """image_embeddings (Bi, h, w, C); image_pe (1, h, w, C); sparse (B, N, C); dense
    (B, h, w, C); high_res_features [(Bi, 4h, 4w, C/8), (Bi, 2h, 2w, C/4)] (projected).

    Returns masks (B, M, 4h, 4w), iou_pred (B, M), object_score_logits (B, 1).
    """
    masks, iou_pred, obj = self.predict_masks(image_embeddings, image_pe,
                                              sparse_prompt_embeddings,
                                              dense_prompt_embeddings, repeat_image,
                                              high_res_features, token_mask)
    if multimask_output:
      return masks[:, 1:], iou_pred[:, 1:], obj
    if self.dynamic_multimask_via_stability:
      masks, iou_pred = self._dynamic_multimask_via_stability(masks, iou_pred)
      return masks, iou_pred, obj
    return masks[:, :1], iou_pred[:, :1], obj

  def predict_masks(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                    dense_prompt_embeddings, repeat_image, high_res_features=None,
                    token_mask=None):
    b = sparse_prompt_embeddings.shape[0]
    toks = [self.iou_token.embedding, self.mask_tokens.embedding]
    s = 0
    if self.pred_obj_scores:
      toks = [self.obj_score_token.embedding] + toks
      s = 1
    output_tokens = jnp.concatenate(toks, 0)
    n_out = output_tokens.shape[0]
    output_tokens = jnp.broadcast_to(output_tokens[None], (b,) + output_tokens.shape)
    tokens = jnp.concatenate(
        [output_tokens, sparse_prompt_embeddings.astype(output_tokens.dtype)], 1)
    if token_mask is not None:
      token_mask = jnp.concatenate([jnp.ones((b, n_out), bool), token_mask.astype(bool)], 1)
    if repeat_image:
      src = jnp.repeat(image_embeddings, b, axis=0)
    else:
      assert image_embeddings.shape[0] == b
      src = image_embeddings
    src = src + dense_prompt_embeddings
    pos_src = jnp.broadcast_to(image_pe, src.shape)
    _, h, w, c = src.shape
    hs, src = self.transformer(src, pos_src, tokens, token_mask)
    iou_token_out = hs[:, s, :]
    mask_tokens_out = hs[:, s + 1:s + 1 + self.num_mask_tokens, :]
    src = src.reshape(b, h, w, c)
    up = self.output_upscaling
    if not self.use_high_res_features:
      upscaled = up(src)
    else:
      feat_s0, feat_s1 = high_res_features
      if repeat_image:
        feat_s0 = jnp.repeat(feat_s0, b, axis=0)
        feat_s1 = jnp.repeat(feat_s1, b, axis=0)
      upscaled = up.with_skips(src, feat_s0, feat_s1)
    hyper_in = jnp.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in
                          enumerate(self.output_hypernetworks_mlps)], axis=1)
    masks = jnp.einsum("bmc,bhwc->bmhw", hyper_in, upscaled)
    iou_pred = self.iou_prediction_head(iou_token_out)
    if self.pred_obj_scores:
      obj = self.pred_obj_score_head(hs[:, 0, :])
    else:
      obj = 10.0 * jnp.ones((b, 1), iou_pred.dtype)
    return masks, iou_pred, obj

  def _dynamic_multimask_via_stability(self, all_masks, all_iou):
    multi_masks, multi_iou = all_masks[:, 1:], all_iou[:, 1:]
    best = jnp.argmax(multi_iou, axis=-1)
    best_masks = jnp.take_along_axis(multi_masks, best[:, None, None, None], axis=1)
    best_iou = jnp.take_along_axis(multi_iou, best[:, None], axis=1)
    single_masks, single_iou = all_masks[:, :1], all_iou[:, :1]
    flat = single_masks.reshape(single_masks.shape[0], 1, -1)
    delta = self.dynamic_multimask_stability_delta
    area_i = jnp.sum(flat > delta, axis=-1).astype(jnp.float32)
    area_u = jnp.sum(flat > -delta, axis=-1).astype(jnp.float32)
    stability = jnp.where(area_u > 0, area_i / jnp.maximum(area_u, 1.0), 1.0)
    stable = stability >= self.dynamic_multimask_stability_thresh  # (B, 1)
    masks = jnp.where(stable[..., None, None], single_masks, best_masks)
    iou = jnp.where(stable, single_iou, best_iou)
    return masks, iou
