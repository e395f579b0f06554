"""Generated multimodal scenes in the official on-disk layouts (no download needed).

    python -m fusionsam_jax.data.generate --layout mfnet --out DIR --num 200 --seed 0

Scenes are built so that fusion is necessary: every class is recognisable from a simple local
appearance (colour, intensity, shape) in at least one modality, but not always in the same one.

* Warm things (MFNet: car, person, bike; FMB: person, car, truck, bus, motorcycle) have a
  class-specific temperature in the thermal image. In RGB they are invisible at night and, by
  day, hidden by low contrast (drawn with the background's own texture) 60 % of the time.
* Cold things (MFNet: curve, car_stop, guardrail, color_cone, bump; FMB: sign, bicycle, pole)
  and painted markings have no thermal signature (the thermal image shows the background
  there) but a distinct colour in RGB, by day and (dimmer, lit by headlights) at night.
* FMB's "stuff" classes (road, sidewalk, building, vegetation, sky) are visible in both; lamps
  are bright in RGB and hot in thermal.
* VDT-2048 (saliency): each salient object stands out in a random non-empty subset of
  {RGB (saturated colour), depth (near), thermal (warm)}; a single modality misses it ~40 % of
  the time. Background clutter is low-contrast in every modality.

Noise (Gaussian, per pixel), smooth background textures and per-image lighting vary. Output is
deterministic: the same (layout, seed, index, size) gives byte-identical files, independent of
``num`` (sample i only depends on the seed and i).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import tqdm
from PIL import Image

from fusionsam_jax import fsutil
from fusionsam_jax.data import datasets
from fusionsam_jax.data.datasets import carve_val, DatasetSpec

GENERATOR_VERSION = 1
DEFAULT_SIZE = (96, 128)  # (height, width): small for fast CPU demos; --native for full size
NIGHT_SHARE = 0.5
DAY_HIDDEN_SHARE = 0.6  # warm objects hidden in RGB by day (low contrast)


# ------------------------------------------------------------------------------------------
# Drawing helpers (coordinates are fractions of the image height / width)
# ------------------------------------------------------------------------------------------


class _Canvas:
  def __init__(self, height: int, width: int, rng: np.random.Generator):
    self.h, self.w, self.rng = height, width, rng
    self.yy = ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None]
    self.xx = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, :]

  def rect(self, y0, x0, y1, x1) -> np.ndarray:
    return (self.yy >= y0) & (self.yy < y1) & (self.xx >= x0) & (self.xx < x1)

  def ellipse(self, cy, cx, ry, rx) -> np.ndarray:
    return ((self.yy - cy) / ry) ** 2 + ((self.xx - cx) / rx) ** 2 <= 1.0

  def triangle(self, top, bottom, cx, half_base) -> np.ndarray:
    t = (self.yy - top) / max(bottom - top, 1e-6)
    return (t >= 0) & (t <= 1) & (np.abs(self.xx - cx) <= t * half_base)

  def band(self, y_left, y_right, thickness, x0, x1) -> np.ndarray:
    """A slanted stripe from (y_left, x0) to (y_right, x1)."""
    slope = (y_right - y_left) / max(x1 - x0, 1e-6)
    centre = y_left + (self.xx - x0) * slope
    return (np.abs(self.yy - centre) <= thickness / 2) & (self.xx >= x0) & (self.xx < x1)

  def smooth(self, cells: int, amplitude: float) -> np.ndarray:
    """Low-frequency texture in [-amplitude, amplitude], float32 (H, W)."""
    gh, gw = cells, max(2, int(round(cells * self.w / self.h)))
    grid = self.rng.uniform(-amplitude, amplitude, (gh, gw)).astype(np.float32)
    img = Image.fromarray(grid)  # float32 -> mode "F"
    return np.asarray(img.resize((self.w, self.h), Image.BILINEAR), dtype=np.float32)

  def noise(self, sigma: float, channels: int) -> np.ndarray:
    return self.rng.normal(0.0, sigma, (self.h, self.w, channels)).astype(np.float32)


def _to_u8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _jitter(rng, colour, amount=12.0):
  return np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


# ------------------------------------------------------------------------------------------
# MFNet-like urban scenes (9 classes)
# ------------------------------------------------------------------------------------------

# Scene colours (not the label palette): distinct hues so each class is recognisable locally.
_MF_RGB = {1: (150, 30, 30), 2: (60, 170, 60), 3: (40, 170, 190), 4: (40, 60, 220),
           5: (210, 200, 40), 6: (225, 225, 225), 7: (245, 120, 20), 8: (200, 50, 180)}
_MF_TEMP = {1: 140.0, 2: 215.0, 3: 178.0}  # warm classes only
_MF_WARM = (1, 2, 3)


def _mf_shape(cv: _Canvas, cls: int, rng) -> np.ndarray:
  u = rng.uniform
  if cls == 1:  # car: wide box on the road
    w, h = u(0.25, 0.4), u(0.16, 0.26)
    x0, y1 = u(0.0, 1.0 - w), u(0.6, 0.97)
    return cv.rect(y1 - h, x0, y1, x0 + w)
  if cls == 2:  # person: tall ellipse
    ry, rx = u(0.15, 0.22), u(0.06, 0.085)
    return cv.ellipse(u(0.45, 0.78), u(0.08, 0.92), ry, rx)
  if cls == 3:  # bike: flat ellipse
    ry, rx = u(0.09, 0.12), u(0.11, 0.16)
    return cv.ellipse(u(0.6, 0.86), u(0.12, 0.88), ry, rx)
  if cls == 4:  # curve: slanted painted kerb line
    x0 = u(0.0, 0.3)
    x1 = u(0.6, 1.0)
    return cv.band(u(0.62, 0.93), u(0.62, 0.93), u(0.07, 0.1), x0, x1)
  if cls == 5:  # car_stop: low wide block
    w, h = u(0.16, 0.24), u(0.09, 0.12)
    x0, y0 = u(0.0, 1.0 - w), u(0.72, 0.98 - h)
    return cv.rect(y0, x0, y0 + h, x0 + w)
  if cls == 6:  # guardrail: long band near the horizon
    w, h = u(0.5, 0.9), u(0.08, 0.11)
    x0, y0 = u(0.0, 1.0 - w), u(0.36, 0.48)
    return cv.rect(y0, x0, y0 + h, x0 + w)
  if cls == 7:  # color_cone: triangle
    hgt, hb = u(0.2, 0.28), u(0.07, 0.1)
    top = u(0.5, 0.97 - hgt)
    return cv.triangle(top, top + hgt, u(0.08, 0.92), hb)
  if cls == 8:  # bump: band across the road
    w, h = u(0.35, 0.65), u(0.08, 0.11)
    x0, y0 = u(0.0, 1.0 - w), u(0.68, 0.98 - h)
    return cv.rect(y0, x0, y0 + h, x0 + w)
  raise ValueError(cls)


def _mfnet_scene(rng: np.random.Generator, index: int, h: int, w: int, night: bool,
                 period: int) -> dict:
  cv = _Canvas(h, w, rng)
  horizon = rng.uniform(0.35, 0.45)
  upper = cv.yy < horizon
  # Background: facades/sky above the horizon, road below, both textured.
  bg = np.where(upper[..., None], _jitter(rng, (130, 120, 110), 15),
                _jitter(rng, (92, 92, 96), 10)).astype(np.float32)
  bg = bg + cv.smooth(6, 18.0)[..., None] + cv.smooth(3, 10.0)[..., None]
  light = rng.uniform(0.12, 0.2) if night else rng.uniform(0.75, 1.15)
  bg_rgb = bg * light
  rgb = bg_rgb.copy()
  t_road = rng.uniform(50, 65) if night else rng.uniform(75, 92)
  thermal = np.where(upper, rng.uniform(28, 40), t_road).astype(np.float32)
  thermal = thermal + cv.smooth(5, 9.0) + (cv.yy - horizon).clip(0) * 15.0
  label = np.zeros((h, w), np.uint8)

  k = int(rng.integers(3, 5))
  classes = [1 + _rotation(period, index, 8)] + [
      int(c) for c in rng.permutation(np.arange(1, 9))]
  classes = list(dict.fromkeys(classes))[:k]
  # Paint back to front: larger (far, near the horizon) things first, people last.
  order = {6: 0, 4: 1, 8: 2, 5: 3, 1: 4, 7: 5, 3: 6, 2: 7}
  for cls in sorted(classes, key=order.get):
    mask = _mf_shape(cv, cls, rng)
    label[mask] = cls
    if cls in _MF_WARM:
      thermal[mask] = _MF_TEMP[cls] + rng.uniform(-6, 6)
      hidden = night or rng.random() < DAY_HIDDEN_SHARE
      if hidden:  # no contrast at all: RGB shows the background texture there
        rgb[mask] = bg_rgb[mask]
      else:
        rgb[mask] = _jitter(rng, _MF_RGB[cls]) * rng.uniform(0.85, 1.1)
    else:
      lit = rng.uniform(0.5, 0.75) if night else light * rng.uniform(0.9, 1.1)
      rgb[mask] = _jitter(rng, _MF_RGB[cls]) * lit
      # no thermal signature: thermal keeps the background there
  rgb = rgb + cv.noise(rng.uniform(3.0, 7.0), 3)
  thermal = thermal + cv.noise(rng.uniform(2.5, 5.0), 1)[..., 0]
  return {"rgb": _to_u8(rgb), "thermal": _to_u8(thermal)[..., None], "label": label}


# ------------------------------------------------------------------------------------------
# FMB-like street scenes (15 classes)
# ------------------------------------------------------------------------------------------

_FMB_RGB = {0: (120, 118, 100), 1: (80, 80, 86), 2: (190, 165, 165), 3: (150, 105, 75),
            4: (255, 245, 190), 5: (30, 110, 255), 6: (45, 140, 45), 7: (120, 170, 230),
            8: (60, 200, 90), 9: (160, 25, 25), 10: (200, 120, 40), 11: (235, 205, 35),
            12: (110, 40, 170), 13: (40, 190, 200), 14: (130, 130, 210)}
_FMB_TEMP_STUFF = {0: 55.0, 1: 88.0, 2: 72.0, 3: 100.0, 6: 40.0, 7: 15.0}
_FMB_TEMP_WARM = {8: 228.0, 9: 130.0, 10: 155.0, 11: 180.0, 12: 204.0}
_FMB_OBJECTS = (4, 5, 8, 9, 10, 11, 12, 13, 14)


def _fmb_object(cv: _Canvas, cls: int, rng, horizon: float, kerb: float) -> list:
  """Returns [(class, mask), ...] for one object (a lamp comes with its pole)."""
  u = rng.uniform
  if cls == 8:  # person
    return [(8, cv.ellipse(u(kerb - 0.05, 0.82), u(0.06, 0.94), u(0.14, 0.2),
                           u(0.055, 0.08)))]
  if cls in (9, 10, 11):  # car / truck / bus: boxes of different proportions
    w, hh = {9: (u(0.22, 0.32), u(0.14, 0.2)), 10: (u(0.2, 0.28), u(0.25, 0.32)),
             11: (u(0.4, 0.55), u(0.22, 0.28))}[cls]
    x0, y1 = u(0.0, 1.0 - w), u(kerb + 0.12, 0.97)
    return [(cls, cv.rect(y1 - hh, x0, y1, x0 + w))]
  if cls == 12:  # motorcycle: flat ellipse
    return [(12, cv.ellipse(u(kerb + 0.12, 0.86), u(0.1, 0.9), u(0.08, 0.11),
                            u(0.1, 0.14)))]
  if cls == 13:  # bicycle: flat ellipse, cold
    return [(13, cv.ellipse(u(kerb, 0.85), u(0.1, 0.9), u(0.08, 0.11), u(0.1, 0.14)))]
  if cls in (14, 4):  # pole (with a lamp on top for class 4)
    x0, pw = u(0.03, 0.9), u(0.05, 0.07)
    top, bottom = u(0.08, horizon), kerb + u(0.0, 0.05)
    out = [(14, cv.rect(top, x0, bottom, x0 + pw))]
    if cls == 4:
      out.append((4, cv.ellipse(top, x0 + pw / 2, u(0.065, 0.085), u(0.055, 0.07))))
    return out
  if cls == 5:  # sign: box on a short post area
    sw, sh = u(0.1, 0.15), u(0.12, 0.16)
    x0, y0 = u(0.0, 1.0 - sw), u(horizon - 0.1, kerb - sh)
    return [(5, cv.rect(y0, x0, y0 + sh, x0 + sw))]
  raise ValueError(cls)


def _fmb_scene(rng: np.random.Generator, index: int, h: int, w: int, night: bool,
               period: int) -> dict:
  cv = _Canvas(h, w, rng)
  horizon = rng.uniform(0.22, 0.32)
  kerb = rng.uniform(0.52, 0.6)  # sidewalk from here, road below road_top
  road_top = kerb + rng.uniform(0.07, 0.1)
  region = np.zeros((h, w), np.uint8)  # background (0) between horizon and kerb
  region[np.broadcast_to(cv.yy < horizon, (h, w))] = 7
  region[np.broadcast_to((cv.yy >= kerb) & (cv.yy < road_top), (h, w))] = 2
  region[np.broadcast_to(cv.yy >= road_top, (h, w))] = 1
  for _ in range(int(rng.integers(1, 4))):  # buildings standing on the kerb
    bw = rng.uniform(0.15, 0.3)
    x0 = rng.uniform(0, 1 - bw)
    region[cv.rect(rng.uniform(0.05, horizon + 0.05), x0, kerb, x0 + bw)] = 3
  for _ in range(int(rng.integers(1, 3))):  # trees / bushes
    region[cv.ellipse(rng.uniform(horizon, kerb - 0.05), rng.uniform(0.05, 0.95),
                      rng.uniform(0.08, 0.13), rng.uniform(0.06, 0.1))] = 6
  stuff_light = rng.uniform(0.35, 0.5) if night else rng.uniform(0.75, 1.15)
  rgb = np.zeros((h, w, 3), np.float32)
  thermal = np.zeros((h, w), np.float32)
  for cls in (0, 1, 2, 3, 6, 7):
    m = region == cls
    colour = _FMB_RGB[cls] if not (night and cls == 7) else (20, 25, 45)
    rgb[m] = _jitter(rng, colour, 10) * stuff_light
    thermal[m] = _FMB_TEMP_STUFF[cls] + rng.uniform(-5, 5)
  rgb = rgb + cv.smooth(6, 12.0)[..., None] * stuff_light
  stuff_rgb = rgb.copy()
  thermal = thermal + cv.smooth(5, 6.0)
  label = region.copy()

  k = int(rng.integers(3, 6))
  classes = [_FMB_OBJECTS[_rotation(period, index, len(_FMB_OBJECTS))]] + [
      int(c) for c in rng.permutation(np.asarray(_FMB_OBJECTS))]
  classes = list(dict.fromkeys(classes))[:k]
  order = {14: 0, 4: 0, 5: 1, 11: 2, 10: 3, 9: 4, 13: 5, 12: 6, 8: 7}
  for obj in sorted(classes, key=order.get):
    for cls, mask in _fmb_object(cv, obj, rng, horizon, kerb):
      label[mask] = cls
      if cls in _FMB_TEMP_WARM:
        thermal[mask] = _FMB_TEMP_WARM[cls] + rng.uniform(-4, 4)
        if night or rng.random() < DAY_HIDDEN_SHARE:  # RGB shows the scene behind
          rgb[mask] = stuff_rgb[mask]
        else:
          rgb[mask] = _jitter(rng, _FMB_RGB[cls]) * rng.uniform(0.85, 1.1)
      elif cls == 4:  # lamp: bright and hot
        thermal[mask] = 252.0
        rgb[mask] = _jitter(rng, _FMB_RGB[4], 8)
      else:  # cold objects: colour only
        lit = rng.uniform(0.5, 0.75) if night else stuff_light * rng.uniform(0.9, 1.1)
        rgb[mask] = _jitter(rng, _FMB_RGB[cls]) * lit
  rgb = rgb + cv.noise(rng.uniform(3.0, 7.0), 3)
  thermal = thermal + cv.noise(rng.uniform(2.5, 5.0), 1)[..., 0]
  return {"rgb": _to_u8(rgb), "thermal": _to_u8(thermal)[..., None], "label": label}


# ------------------------------------------------------------------------------------------
# VDT-2048-like salient objects (RGB + depth + thermal, binary)
# ------------------------------------------------------------------------------------------

# Non-empty subsets of (rgb, depth, thermal) where a salient object stands out.
_VDT_SUBSETS = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]


def _vdt_scene(rng: np.random.Generator, index: int, h: int, w: int, night: bool,
               period: int) -> dict:
  cv = _Canvas(h, w, rng)
  wall = _jitter(rng, (150, 140, 125), 20)
  light = rng.uniform(0.15, 0.3) if night else rng.uniform(0.75, 1.1)
  rgb = (np.broadcast_to(wall, (h, w, 3)) + cv.smooth(5, 20.0)[..., None]).astype(np.float32)
  depth = (55.0 + 45.0 * cv.yy + cv.smooth(4, 8.0)).astype(np.float32)
  depth = np.broadcast_to(depth, (h, w)).copy()
  thermal = np.broadcast_to(rng.uniform(55, 80) + cv.smooth(4, 10.0), (h, w)).copy()
  for _ in range(int(rng.integers(2, 5))):  # low-contrast clutter in every modality
    m = cv.ellipse(rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.15),
                   rng.uniform(0.05, 0.15))
    rgb[m] += rng.uniform(-25, 25)
    depth[m] += rng.uniform(5, 20)
    thermal[m] += rng.uniform(5, 20)
  rgb *= light
  label = np.zeros((h, w), np.uint8)
  n_obj = 1 if rng.random() < 0.7 else 2
  for j in range(n_obj):
    cy, cx = rng.uniform(0.3, 0.75), rng.uniform(0.2, 0.8)
    ry, rx = rng.uniform(0.12, 0.25), rng.uniform(0.1, 0.2)
    mask = cv.ellipse(cy, cx, ry, rx) if rng.random() < 0.5 else cv.rect(
        cy - ry, cx - rx, cy + ry, cx + rx)
    label[mask] = 1
    vis_rgb, vis_d, vis_t = _VDT_SUBSETS[(index + 3 * j) % len(_VDT_SUBSETS)]
    hue = rng.permutation(np.asarray([230.0, rng.uniform(0, 80), rng.uniform(20, 120)]))
    if vis_rgb:  # a saturated colour, lit even in dark scenes
      rgb[mask] = hue * rng.uniform(0.8, 1.0)
    depth[mask] = rng.uniform(175, 215) if vis_d else depth[mask]
    thermal[mask] = rng.uniform(175, 220) if vis_t else thermal[mask]
  rgb = rgb + cv.noise(rng.uniform(3.0, 7.0), 3)
  depth = depth + cv.noise(rng.uniform(2.0, 4.0), 1)[..., 0]
  thermal = thermal + cv.noise(rng.uniform(2.5, 5.0), 1)[..., 0]
  return {"rgb": _to_u8(rgb), "depth": _to_u8(depth)[..., None],
          "thermal": _to_u8(thermal)[..., None], "label": label}


#: Drawing families: name -> (scene function, class count, modalities drawn). A spec's
#: `SceneRecipe.scenes` names one; the spec's writer stores what it draws.
SCENES = {"mfnet": (_mfnet_scene, 9, ("rgb", "thermal")),
          "fmb": (_fmb_scene, 15, ("rgb", "thermal")),
          "vdt": (_vdt_scene, 2, ("rgb", "depth", "thermal"))}


class GeneratorError(ValueError):
  """The dataset cannot be generated (no scene recipe, a layout without a writer, classes or
  modalities the recipe does not draw)."""


def _recipe(spec: DatasetSpec):
  """The spec's recipe and drawing function; raises GeneratorError when it has none."""
  r = spec.generator
  if r is None:
    raise GeneratorError(f"dataset {spec.name!r} has no scene recipe (DatasetSpec.generator): "
                         "it cannot be generated")
  if r.scenes not in SCENES:
    raise GeneratorError(f"dataset {spec.name!r}: unknown scene family {r.scenes!r} "
                         f"(known: {', '.join(SCENES)})")
  fn, n_classes, mods = SCENES[r.scenes]
  if spec.num_classes != n_classes or not set(spec.modalities) <= set(mods):
    raise GeneratorError(f"dataset {spec.name!r} ({spec.num_classes} classes, "
                         f"{'+'.join(spec.modalities)}) does not fit the {r.scenes!r} scenes "
                         f"({n_classes} classes, {'+'.join(mods)})")
  return r, fn


# ------------------------------------------------------------------------------------------
# Splits and names
# ------------------------------------------------------------------------------------------

# Split of sample i = the recipe's split_pattern[i % len(pattern)]; condition (night)
# alternates with i, so every split gets day and night frames in equal shares.


def _rotation(period: int, index: int, n: int) -> int:
  """Cycles 0..n-1 over the samples of every split (each image's first object class), so
  each class appears in every split of a set with a few dozen samples. `period`: the length
  of the split pattern."""
  return (index // period + 2 * (index % period)) % n


def sample_name(layout, index: int) -> str:
  night = is_night(index)
  r, _ = _recipe(datasets.get(layout))
  if r.night_suffix:
    return f"{index + 1:05d}{'N' if night else 'D'}"
  return f"{index + 1:05d}"


def is_night(index: int) -> bool:
  return index % 2 == 1


def sample_split(layout, index: int) -> str:
  pattern = _recipe(datasets.get(layout))[0].split_pattern
  return pattern[index % len(pattern)]


def generate_scene(layout, index: int, seed: int, height: int = DEFAULT_SIZE[0],
                   width: int = DEFAULT_SIZE[1]) -> dict:
  """Sample ``index`` of the generated set ``(layout, seed)`` as a pipeline element.

  `layout`: a dataset name or spec with a scene recipe. Returns ``{"rgb": (H, W, 3),
  "thermal": (H, W, 1), ["depth": (H, W, 1)], "label": (H, W), "name": str}`` (uint8; VDT
  labels are {0, 1}), exactly what the prepared dataset yields.
  """
  spec = datasets.get(layout)
  r, fn = _recipe(spec)
  rng = np.random.default_rng([int(seed), int(index), GENERATOR_VERSION])
  el = fn(rng, index, int(height), int(width), is_night(index), len(r.split_pattern))
  el = {k: v for k, v in el.items() if k == "label" or k in spec.modalities}
  el["name"] = sample_name(spec, index)
  return el


def generate_elements(layout, num: int, seed: int, height: int = DEFAULT_SIZE[0],
                      width: int = DEFAULT_SIZE[1], split: str | None = None) -> list[dict]:
  """In-memory elements of samples ``0..num-1`` (only those of ``split`` if given; "train"
  / "val" follow the layout's val carve where it has one, see ``datasets.carve_val``)."""
  idx = list(range(num))
  if split is not None:
    idx = split_indices(layout, num)[split]
  return [generate_scene(layout, i, seed, height, width) for i in idx]


def split_indices(layout, num: int) -> dict[str, list[int]]:
  """Sample indices of each split of a prepared generated set of ``num`` samples: the
  recipe's on-disk splits; val carved from train when the pattern has none; test_day /
  test_night where the spec has them."""
  spec = datasets.get(layout)
  r, _ = _recipe(spec)
  by = {}
  for i in range(num):
    by.setdefault(sample_split(spec, i), []).append(i)
  out = {s: by.get(s, []) for s in ("train", "val", "test")}
  if "val" not in r.split_pattern:
    names = {sample_name(spec, i): i for i in out["train"]}
    train, val = carve_val(list(names))
    out["train"], out["val"] = [names[n] for n in train], [names[n] for n in val]
  if "test_day" in spec.splits:
    out["test_day"] = [i for i in out["test"] if not is_night(i)]
    out["test_night"] = [i for i in out["test"] if is_night(i)]
  return out


# ------------------------------------------------------------------------------------------
# Writing through the spec's layout
# ------------------------------------------------------------------------------------------


def generate_dataset(layout, out_dir, num: int, seed: int, height: int = DEFAULT_SIZE[0],
                     width: int = DEFAULT_SIZE[1], *, overwrite: bool = False,
                     progress: bool = False) -> dict[str, list[str]]:
  """Writes ``num`` generated samples in the layout of dataset ``layout`` to ``out_dir``.

  The spec's layout writes every sample (``Layout.write_sample``) and its split lists
  (``Layout.write_splits``): MFNet gets split lists (train/val/test 50/25/25 % +
  test_day/test_night by the D/N suffix); FMB (train/test 80/20 %) and VDT-2048 (Train/Test
  50/50 %) get their folders, ``val`` is carved from train by the builder. The folder is
  written under a temporary name and renamed when complete. Returns split -> sample names
  (as the prepared dataset will have them). Raises GeneratorError for a dataset that cannot
  be generated (no recipe, or a layout that cannot write).
  """
  spec = datasets.get(layout)
  _recipe(spec)
  if not spec.layout.can_write:
    raise GeneratorError(f"dataset {spec.name!r}: its layout ({type(spec.layout).__name__}) "
                         "cannot write samples, so it cannot be generated")
  if num < 1:
    raise ValueError(f"num={num}: expected at least 1 sample")
  if height < 16 or width < 16:
    raise ValueError(f"size {height}x{width}: expected at least 16x16")
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.lexists(out_dir) and (os.path.islink(out_dir) or not os.path.isdir(out_dir)):
    raise FileExistsError(f"{out_dir}: exists and is not a folder (a file or a link); "
                          "choose another --out")
  if os.path.exists(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise FileExistsError(f"{out_dir}: exists and is not empty (pass overwrite=True / "
                            "--overwrite)")
    if not os.path.isfile(os.path.join(out_dir, "generated.json")):
      # --overwrite replaces a scene set this generator wrote, never another folder.
      raise FileExistsError(f"{out_dir}: --overwrite replaces only a folder the generator "
                            "wrote (it has generated.json); this one was not: nothing was "
                            "deleted")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  # Temporary folders of killed generators (named with their pid) are removed first.
  fsutil.clean_orphans(parent, [f".{os.path.basename(out_dir)}-generating-"])
  tmp = tempfile.mkdtemp(prefix=fsutil.temp_prefix(f".{os.path.basename(out_dir)}-generating-"),
                         dir=parent)
  try:
    for sub in spec.layout.folders():
      os.makedirs(os.path.join(tmp, sub))
    it = range(num)
    if progress:
      it = tqdm.tqdm(it, desc=f"Generating {spec.name}", unit="sample")
    for i in it:
      el = generate_scene(spec, i, seed, height, width)
      spec.layout.write_sample(tmp, el, sample_split(spec, i))
    splits = {s: [sample_name(spec, i) for i in idx]
              for s, idx in split_indices(spec, num).items()}
    spec.layout.write_splits(tmp, splits)
    meta = {"generator": "fusionsam_jax.data.generate", "generator_version":
            GENERATOR_VERSION, "layout": spec.name, "num": num, "seed": seed,
            "height": height, "width": width,
            "split_sizes": {s: len(v) for s, v in splits.items()}}
    with open(os.path.join(tmp, "generated.json"), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
      f.write("\n")
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return splits


if __name__ == "__main__":   # python -m fusionsam_jax.data.generate
  from fusionsam_jax.cli import driver, generate
  driver.main(generate)
