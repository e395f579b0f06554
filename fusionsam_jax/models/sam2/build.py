"""`build_sam2(config_file, ckpt_path)`, as in `sam2.build_sam`, for the image path.

  sam2_model = build_sam2("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt")
  predictor = SAM2ImagePredictor(sam2_model)

`config_file` names the variant: any official config path or name (`sam2.1_hiera_l.yaml`,
`configs/sam2/sam2_hiera_b+.yaml`, ...) or a preset name of `SAM2_PRESETS` (`hiera_t`,
`tiny`). SAM 2 and SAM 2.1 share the image path, so both configs map to the same preset.
`ckpt_path` may be
- an official `.pt` (converted in memory; needs PyTorch);
- a directory written by tools/convert_sam2_weights.py (Orbax params + sam2_meta.json);
- a folder holding one official `.pt` (a Hugging Face `facebook/sam2*` download);
- None: random weights.
The builder checks that the weights are the variant the config names.
"""

import dataclasses
import os
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

try:  # for Hugging Face ids (downloads); local folders need nothing
  from huggingface_hub import hf_hub_download
except ImportError:  # pragma: no cover - depends on the install
  hf_hub_download = None

from fusionsam_jax.models.sam.checkpoint import CheckpointError
from fusionsam_jax.models.sam2.checkpoint import load_sam2_any
from fusionsam_jax.models.sam2.sam2 import SAM2_PRESETS, LoadedSam2, Sam2, preset_name

# `sam2.build_sam.HF_MODEL_ID_TO_FILENAMES`: Hugging Face id -> (config, checkpoint file).
HF_MODEL_ID_TO_FILENAMES = {
    "facebook/sam2-hiera-tiny": ("configs/sam2/sam2_hiera_t.yaml", "sam2_hiera_tiny.pt"),
    "facebook/sam2-hiera-small": ("configs/sam2/sam2_hiera_s.yaml", "sam2_hiera_small.pt"),
    "facebook/sam2-hiera-base-plus": ("configs/sam2/sam2_hiera_b+.yaml",
                                      "sam2_hiera_base_plus.pt"),
    "facebook/sam2-hiera-large": ("configs/sam2/sam2_hiera_l.yaml", "sam2_hiera_large.pt"),
    "facebook/sam2.1-hiera-tiny": ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
    "facebook/sam2.1-hiera-small": ("configs/sam2.1/sam2.1_hiera_s.yaml",
                                    "sam2.1_hiera_small.pt"),
    "facebook/sam2.1-hiera-base-plus": ("configs/sam2.1/sam2.1_hiera_b+.yaml",
                                        "sam2.1_hiera_base_plus.pt"),
    "facebook/sam2.1-hiera-large": ("configs/sam2.1/sam2.1_hiera_l.yaml",
                                    "sam2.1_hiera_large.pt"),
}

_CONFIG_RE = re.compile(r"hiera_(t|s|b\+|l)(\.yaml)?$")


def variant_of_config(config_file: str) -> str:
  """An official config path / name or a preset name -> the preset name."""
  name = os.path.basename(os.fspath(config_file))
  if name in SAM2_PRESETS:
    return name
  m = _CONFIG_RE.search(name)
  if m is None or not name.startswith(("sam2_", "sam2.1_")):
    raise ValueError(f"config_file {config_file!r}: expected an official SAM 2 config "
                     "(e.g. configs/sam2.1/sam2.1_hiera_l.yaml) or one of "
                     + ", ".join(SAM2_PRESETS))
  return f"hiera_{m.group(1)}"


def build_sam2(config_file: str, ckpt_path: Optional[str] = None, device=None,
               mode: str = "eval", hydra_overrides_extra: Sequence[str] = (),
               apply_postprocessing: bool = True, encoder_dtype=jnp.float32,
               attn_impl: str = "xla", seed: int = 0, **kwargs) -> LoadedSam2:
  """The official signature; `device` and `mode` are accepted and ignored (JAX places the
  arrays; there is no training mode). `apply_postprocessing=False` turns off the dynamic
  multimask-via-stability choice, as in `sam2`. Hydra overrides are not supported."""
  if hydra_overrides_extra:
    raise ValueError("build_sam2: hydra_overrides_extra is not supported (the variant comes "
                     "from config_file; pick a preset for other sizes)")
  if mode not in ("eval", "train"):
    raise ValueError(f"build_sam2: mode must be 'eval' or 'train', got {mode!r}")
  variant = variant_of_config(config_file)
  want = dataclasses.replace(SAM2_PRESETS[variant],
                             dynamic_multimask_via_stability=bool(apply_postprocessing))
  if ckpt_path is None:
    params = Sam2(want).init_params(jax.random.PRNGKey(seed))
    return LoadedSam2(want, params, encoder_dtype, attn_impl)
  cfg, params = load_sam2_any(ckpt_path)
  cfg = dataclasses.replace(cfg, dynamic_multimask_via_stability=bool(apply_postprocessing))
  if cfg != want:
    found = preset_name(dataclasses.replace(cfg, dynamic_multimask_via_stability=True))
    raise CheckpointError(f"{ckpt_path}: {config_file} needs {variant} weights, found "
                          f"{found or 'a custom size'}")
  return LoadedSam2(cfg, params, encoder_dtype, attn_impl)


def build_sam2_hf(model_id: str, **kwargs) -> LoadedSam2:
  """`build_sam2` from a Hugging Face id: a local folder (a download of the repository, or a
  converted directory), or an id of `HF_MODEL_ID_TO_FILENAMES` fetched with `huggingface_hub`
  (needs network access unless it is in the local cache)."""
  if os.path.isdir(model_id):
    cfg, params = load_sam2_any(model_id)
    cfg = dataclasses.replace(
        cfg, dynamic_multimask_via_stability=bool(kwargs.get("apply_postprocessing", True)))
    return LoadedSam2(cfg, params, kwargs.get("encoder_dtype", jnp.float32),
                      kwargs.get("attn_impl", "xla"))
  if model_id not in HF_MODEL_ID_TO_FILENAMES:
    raise ValueError(f"{model_id!r}: neither a local folder nor a known SAM 2 model id ("
                     + ", ".join(HF_MODEL_ID_TO_FILENAMES) + ")")
  if hf_hub_download is None:
    raise ValueError(f"{model_id!r}: downloading needs huggingface_hub (pip install "
                     "huggingface_hub), or pass a local folder")
  config_name, checkpoint_name = HF_MODEL_ID_TO_FILENAMES[model_id]
  ckpt_path = hf_hub_download(repo_id=model_id, filename=checkpoint_name)
  return build_sam2(config_file=config_name, ckpt_path=ckpt_path, **kwargs)
