"""FusionSAM's parts, declared once: the fusion-module registry and `ParamLayout`.

`ParamLayout` maps each role of the model (tokenizers, fusion module, fused-image decoder,
SAM image encoder, prompt encoders, mask decoder) to its top-level param keys for one model
config, and derives the groups the rest of the package reads:

* ``fusion_path``: everything upstream of the SAM image encoder (cast to
  ``model.fusion_dtype`` / ``model.train_dtype`` by `models.functional`);
* ``embedding_inputs``: what a cached SAM embedding depends on (the fusion path + the image
  encoder: hashed into the embedding-cache key);
* ``fusion_trainable`` / ``head_trainable`` / ``head``: what the fusion and segmentation
  stages train and read.

A fusion module (``model.fusion``) is one `FusionModule` entry in `FUSIONS`: its name, the
top-level param key it lives under, a factory ``make(model) -> flax Module`` called in
``FusionSAM.setup`` and the model-config entry that holds its options. A module maps the
list of per-modality latents ``[(B, h, w, d_c)] * M`` to ``dict(fusion=(B, h, w, d_c))``.
Adding one is its file + one `register_fusion` call (docs/extending.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence


@dataclasses.dataclass(frozen=True)
class FusionModule:
  """A fusion module: ``model.fusion = name`` selects it.

  name: the ``model.fusion`` value. param_key: its top-level param name (its subtree of the
  model's params). make(model) -> flax Module: called in ``FusionSAM.setup`` with the
  FusionSAM module (``model.fusion_kwargs``: the options below; ``model.latent_dim``,
  ``model.attn_impl``, ... are there too). min_modalities: with fewer input modalities the
  model uses ``fallback`` instead (FMP's cross-domain attention needs two). options: the
  ``config.model`` entry holding its keyword options (None: none); it is part of the
  embedding-cache key.
  """
  name: str
  param_key: str
  make: Callable[[Any], Any]
  min_modalities: int = 1
  fallback: str | None = None
  options: str | None = None


#: The registered fusion modules by ``model.fusion`` name.
FUSIONS: dict[str, FusionModule] = {}


def register_fusion(spec: FusionModule) -> FusionModule:
  """Adds `spec` to `FUSIONS` (returns it). Raises ValueError when its name or param key is
  taken by another entry, or when its param key is a role of the model."""
  old = FUSIONS.get(spec.name)
  if old is not None and old != spec:
    raise ValueError(f"fusion module {spec.name!r} is already registered ({old})")
  for other in FUSIONS.values():
    if other.name != spec.name and other.param_key == spec.param_key:
      raise ValueError(f"fusion module {spec.name!r}: param key {spec.param_key!r} is "
                       f"already the key of {other.name!r}")
  if spec.param_key in FIXED_KEYS or spec.param_key.startswith(("tokenizer_", "patch_embed_")):
    raise ValueError(f"fusion module {spec.name!r}: param key {spec.param_key!r} is a model "
                     "part's name")
  FUSIONS[spec.name] = spec
  return spec


def fusion_module(name: str, num_modalities: int) -> FusionModule:
  """The module that ``model.fusion = name`` uses with `num_modalities` inputs (its
  ``fallback`` below ``min_modalities``). Raises ValueError for an unknown name."""
  if name not in FUSIONS:
    raise ValueError(f"model.fusion {name!r}: expected one of {', '.join(sorted(FUSIONS))}")
  spec = FUSIONS[name]
  if num_modalities < spec.min_modalities:
    if spec.fallback is None:
      raise ValueError(f"model.fusion {name!r} needs {spec.min_modalities} modalities, the "
                       f"model has {num_modalities}")
    return fusion_module(spec.fallback, num_modalities)
  return spec


FUSED_DECODER = "fused_decoder"
IMAGE_ENCODER = "image_encoder"
PROMPT_ENCODER = "prompt_encoder"
POINT_PROMPT = "point_prompt"
MASK_DECODER = "mask_decoder"
FIXED_KEYS = (FUSED_DECODER, IMAGE_ENCODER, PROMPT_ENCODER, POINT_PROMPT, MASK_DECODER)
#: Prompt-encoder parts that train: the dense-prompt stack and the foreground point
#: embedding (SAM's random-Fourier matrix stays fixed; no_mask_embed is unused).
PROMPT_TRAINABLE = (f"{PROMPT_ENCODER}/mask_downscaling", f"{PROMPT_ENCODER}/point_embeddings_1")


def tokenizer_key(modality: str) -> str:
  """The LSTG tokenizer of a modality."""
  return f"tokenizer_{modality}"


def patch_embed_key(modality: str) -> str:
  """The patch embedding of a modality (ablation A: no LSTG)."""
  return f"patch_embed_{modality}"


@dataclasses.dataclass(frozen=True)
class ParamLayout:
  """Role -> top-level param keys of one FusionSAM config (see the module docstring).

  tokenizers: ``tokenizer_<m>`` per modality (LSTG; () with patch embeddings).
  patch_embeds: ``patch_embed_<m>`` (ablation A; () with LSTG). fusion: the fusion module's
  key. The SAM-side roles have fixed keys; ``prompt_trainable`` are '/'-paths inside the
  prompt encoder.
  """
  modalities: tuple[str, ...]
  tokenizers: tuple[str, ...]
  patch_embeds: tuple[str, ...]
  fusion: str
  fusion_spec: FusionModule
  fused_decoder: str = FUSED_DECODER
  image_encoder: str = IMAGE_ENCODER
  prompt_encoder: str = PROMPT_ENCODER
  prompt_trainable: tuple[str, ...] = PROMPT_TRAINABLE
  point_prompt: str = POINT_PROMPT
  mask_decoder: str = MASK_DECODER

  @classmethod
  def build(cls, modalities: Sequence[str], tokenizer_kind: str = "lstg",
            fusion: str = "fmp") -> "ParamLayout":
    """Raises ValueError for an unknown tokenizer kind or fusion module."""
    mods = tuple(modalities)
    if tokenizer_kind not in ("lstg", "patch"):
      raise ValueError(f"tokenizer_kind must be 'lstg' or 'patch', got {tokenizer_kind!r}")
    lstg = tokenizer_kind == "lstg"
    spec = fusion_module(fusion, len(mods))
    return cls(modalities=mods,
               tokenizers=tuple(tokenizer_key(m) for m in mods) if lstg else (),
               patch_embeds=() if lstg else tuple(patch_embed_key(m) for m in mods),
               fusion=spec.param_key, fusion_spec=spec)

  @property
  def fusion_trainable(self) -> tuple[str, ...]:
    """The fusion path past the LSTG tokenizers: fusion module, patch embeddings, fused-image
    decoder (what the fusion stage trains)."""
    return (self.fusion,) + self.patch_embeds + (self.fused_decoder,)

  @property
  def fusion_path(self) -> tuple[str, ...]:
    """Everything upstream of the SAM image encoder: computed in the fusion dtypes."""
    return self.tokenizers + self.fusion_trainable

  @property
  def embedding_inputs(self) -> tuple[str, ...]:
    """The params a SAM embedding of the fused image depends on (the embedding-cache key)."""
    return self.fusion_path + (self.image_encoder,)

  @property
  def head(self) -> tuple[str, ...]:
    """Prompt encoders and mask decoder (top-level keys)."""
    return (self.prompt_encoder, self.point_prompt, self.mask_decoder)

  @property
  def head_trainable(self) -> tuple[str, ...]:
    """The parts of `head` that train ('/'-paths)."""
    return (self.point_prompt, self.mask_decoder) + self.prompt_trainable
