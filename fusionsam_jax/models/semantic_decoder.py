"""SAM's mask decoder with Full-fledged Output Tokens: one output token per class.

The two-way transformer and the output upscaling keep SAM's names (`transformer`,
`output_upscaling`) so SAM's weights load into them unchanged; the class tokens and the
per-class hypernetwork MLPs start from SAM's mask tokens / MLPs (class i <- SAM's i mod 4,
see `fusionsam.load_sam_weights`).

With ``high_res=True`` (FusionSAM on a SAM 2 backbone) the transformer and the upscaling are
SAM 2's (`models.sam2.sam_heads`, its names, so SAM 2's decoder weights load the same way)
and the upscaling adds SAM 2's projected stride-8 and stride-4 backbone features, as SAM 2's
mask decoder does.
"""

import flax.linen as nn
import jax.numpy as jnp

from fusionsam_jax.models.sam.common import MLP
from fusionsam_jax.models.sam.mask_decoder import OutputUpscaling
from fusionsam_jax.models.sam.transformer import TwoWayTransformer
from fusionsam_jax.models.sam2 import sam_heads as sam2_heads


class SemanticMaskDecoder(nn.Module):
  """Per-class masks (B, K, 4e, 4e) and class logits (B, K) from SAM embeddings + prompts."""

  num_classes: int
  transformer_dim: int = 256
  transformer_depth: int = 2
  transformer_num_heads: int = 8
  transformer_mlp_dim: int = 2048
  high_res: bool = False

  @nn.compact
  def __call__(self, image_embeddings, image_pe, sparse, dense, pooled_fusion,
               high_res_features=None):
    """image_embeddings, dense: (B, e, e, C); image_pe: (1, e, e, C); sparse: (B, N, C);
    pooled_fusion: (B, d_c) mean-pooled fusion representation; high_res_features (with
    `high_res`): ((B, 4e, 4e, C/8), (B, 2e, 2e, C/4))."""
    c = self.transformer_dim
    k = self.num_classes
    b = image_embeddings.shape[0]
    class_tokens = self.param("class_tokens", nn.initializers.normal(1.0), (k, c))
    # Refine the class tokens with the pooled fusion latents (zero-init: starts as SAM).
    refine = nn.Dense(c, kernel_init=nn.initializers.zeros, name="token_refine")(pooled_fusion)
    tokens = class_tokens[None] + refine[:, None, :]  # (B, K, C)
    tokens = jnp.concatenate([tokens, sparse.astype(tokens.dtype)], axis=1)
    src = image_embeddings + dense
    pos = jnp.broadcast_to(image_pe, src.shape)
    _, e_h, e_w, _ = src.shape
    transformer = sam2_heads.TwoWayTransformer if self.high_res else TwoWayTransformer
    hs, src = transformer(self.transformer_depth, c, self.transformer_num_heads,
                          self.transformer_mlp_dim, name="transformer")(src, pos, tokens)
    class_out = hs[:, :k, :]  # (B, K, C)
    src = src.reshape(b, e_h, e_w, c)
    if self.high_res:
      s0, s1 = high_res_features
      upscaled = OutputUpscaling(c, name="output_upscaling").with_skips(src, s0, s1)
    else:
      upscaled = OutputUpscaling(c, name="output_upscaling")(src)
    hyper = jnp.stack([MLP(c, c // 8, 3, name=f"output_hypernetworks_mlps_{i}")(class_out[:, i])
                       for i in range(k)], axis=1)  # (B, K, C/8)
    masks = jnp.einsum("bkc,bhwc->bkhw", hyper, upscaled)  # (B, K, 4e, 4e)
    class_logits = MLP(c, 1, 3, name="cls_head")(class_out)[..., 0]  # (B, K)
    return masks, class_logits
