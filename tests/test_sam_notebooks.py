"""The official notebooks as tests: the code of segment_anything's `predictor_example` and
sam2's `image_predictor_example`, run once with the official packages and once with only the
import lines changed to `fusionsam_jax.sam` / `fusionsam_jax.sam2`, on the same random
weights and images; everything the notebooks display (each mask passed to `show_mask`) and
their final variables must agree.

The notebook code is kept as written, cell by cell, except: the drawing helpers record what
they are given instead of drawing (`plt` is a stand-in), the images are random pictures
saved as `images/truck.jpg` / `images/groceries.jpg` at the notebooks' sizes, and the lines
that load the released checkpoints build the tiny random test models (the real-size
models with the notebooks' own loading lines run under `extended`).
"""

import os
import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

import sam_reference as ref
import sam2_reference as ref2
from fusionsam_jax.models.sam.sam import SAM_PRESETS

TOL = 1e-4
FLIP = 1e-3  # masks may differ only where a logit is at float noise of the threshold

# ---- segment_anything's notebooks/predictor_example.ipynb (code cells, in order) ---------

SAM_IMPORTS_OFFICIAL = ""  # the names are injected (segment_anything/__init__ imports torchvision)
SAM_IMPORTS_OURS = "from fusionsam_jax.sam import sam_model_registry, SamPredictor\n"
SAM_RLS_OFFICIAL = "from segment_anything.utils.transforms import ResizeLongestSide"
SAM_RLS_OURS = "from fusionsam_jax.sam import ResizeLongestSide"

SAM_LOAD_RELEASED = '''
sam_checkpoint = SAM_CHECKPOINT
model_type = MODEL_TYPE

device = "cpu"

sam = sam_model_registry[model_type](checkpoint=sam_checkpoint)
'''

SAM_PREDICTOR_NOTEBOOK = '''
image = cv2.imread('images/truck.jpg')
image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

plt.figure(figsize=(10,10))
plt.imshow(image)
plt.axis('on')
plt.show()

{LOAD}
sam.to(device=device)

predictor = SamPredictor(sam)

predictor.set_image(image)

input_point = np.array([[500, 375]])
input_label = np.array([1])

plt.figure(figsize=(10,10))
plt.imshow(image)
show_points(input_point, input_label, plt.gca())
plt.axis('on')
plt.show()

masks, scores, logits = predictor.predict(
    point_coords=input_point,
    point_labels=input_label,
    multimask_output=True,
)

masks.shape  # (number_of_masks) x H x W

for i, (mask, score) in enumerate(zip(masks, scores)):
    plt.figure(figsize=(10,10))
    plt.imshow(image)
    show_mask(mask, plt.gca())
    show_points(input_point, input_label, plt.gca())
    plt.title(f"Mask {{i+1}}, Score: {{score:.3f}}", fontsize=18)
    plt.axis('off')
    plt.show()

input_point = np.array([[500, 375], [1125, 625]])
input_label = np.array([1, 1])

mask_input = logits[np.argmax(scores), :, :]  # Choose the model's best mask

masks, _, _ = predictor.predict(
    point_coords=input_point,
    point_labels=input_label,
    mask_input=mask_input[None, :, :],
    multimask_output=False,
)

masks.shape

plt.figure(figsize=(10,10))
plt.imshow(image)
show_mask(masks, plt.gca())
show_points(input_point, input_label, plt.gca())
plt.axis('off')
plt.show()

input_point = np.array([[500, 375], [1125, 625]])
input_label = np.array([1, 0])

mask_input = logits[np.argmax(scores), :, :]  # Choose the model's best mask

masks, _, _ = predictor.predict(
    point_coords=input_point,
    point_labels=input_label,
    mask_input=mask_input[None, :, :],
    multimask_output=False,
)

plt.figure(figsize=(10, 10))
plt.imshow(image)
show_mask(masks, plt.gca())
show_points(input_point, input_label, plt.gca())
plt.axis('off')
plt.show()

input_box = np.array([425, 600, 700, 875])

masks, _, _ = predictor.predict(
    point_coords=None,
    point_labels=None,
    box=input_box[None, :],
    multimask_output=False,
)

plt.figure(figsize=(10, 10))
plt.imshow(image)
show_mask(masks[0], plt.gca())
show_box(input_box, plt.gca())
plt.axis('off')
plt.show()

input_box = np.array([425, 600, 700, 875])
input_point = np.array([[575, 750]])
input_label = np.array([0])

masks, _, _ = predictor.predict(
    point_coords=input_point,
    point_labels=input_label,
    box=input_box,
    multimask_output=False,
)

plt.figure(figsize=(10, 10))
plt.imshow(image)
show_mask(masks[0], plt.gca())
show_box(input_box, plt.gca())
show_points(input_point, input_label, plt.gca())
plt.axis('off')
plt.show()

input_boxes = torch.tensor([
    [75, 275, 1725, 850],
    [425, 600, 700, 875],
    [1375, 550, 1650, 800],
    [1240, 675, 1400, 750],
], device=predictor.device)

transformed_boxes = predictor.transform.apply_boxes_torch(input_boxes, image.shape[:2])
masks, _, _ = predictor.predict_torch(
    point_coords=None,
    point_labels=None,
    boxes=transformed_boxes,
    multimask_output=False,
)

masks.shape  # (batch_size) x (num_predicted_masks_per_input) x H x W

plt.figure(figsize=(10, 10))
plt.imshow(image)
for mask in masks:
    show_mask(mask.cpu().numpy(), plt.gca(), random_color=True)
for box in input_boxes:
    show_box(box.cpu().numpy(), plt.gca())
plt.axis('off')
plt.show()

image1 = image  # truck.jpg from above
image1_boxes = torch.tensor([
    [75, 275, 1725, 850],
    [425, 600, 700, 875],
    [1375, 550, 1650, 800],
    [1240, 675, 1400, 750],
], device=sam.device)

image2 = cv2.imread('images/groceries.jpg')
image2 = cv2.cvtColor(image2, cv2.COLOR_BGR2RGB)
image2_boxes = torch.tensor([
    [450, 170, 520, 350],
    [350, 190, 450, 350],
    [500, 170, 580, 350],
    [580, 170, 640, 350],
], device=sam.device)

{RLS}
resize_transform = ResizeLongestSide(sam.image_encoder.img_size)

def prepare_image(image, transform, device):
    image = transform.apply_image(image)
    image = torch.as_tensor(image, device=device.device)
    return image.permute(2, 0, 1).contiguous()

batched_input = [
     {{
         'image': prepare_image(image1, resize_transform, sam),
         'boxes': resize_transform.apply_boxes_torch(image1_boxes, image1.shape[:2]),
         'original_size': image1.shape[:2]
     }},
     {{
         'image': prepare_image(image2, resize_transform, sam),
         'boxes': resize_transform.apply_boxes_torch(image2_boxes, image2.shape[:2]),
         'original_size': image2.shape[:2]
     }}
]

batched_output = sam(batched_input, multimask_output=False)

batched_output[0].keys()

fig, ax = plt.subplots(1, 2, figsize=(20, 20))

ax[0].imshow(image1)
for mask in batched_output[0]['masks']:
    show_mask(mask.cpu().numpy(), ax[0], random_color=True)
for box in image1_boxes:
    show_box(box.cpu().numpy(), ax[0])
ax[0].axis('off')

ax[1].imshow(image2)
for mask in batched_output[1]['masks']:
    show_mask(mask.cpu().numpy(), ax[1], random_color=True)
for box in image2_boxes:
    show_box(box.cpu().numpy(), ax[1])
ax[1].axis('off')

plt.tight_layout()
plt.show()
'''

# ---- sam2's notebooks/image_predictor_example.ipynb (code cells, in order) ----------------

SAM2_IMPORTS_OURS = ("from fusionsam_jax.sam2 import build_sam2\n"
                     "from fusionsam_jax.sam2 import SAM2ImagePredictor\n")

SAM2_LOAD_RELEASED = '''
sam2_checkpoint = SAM2_CHECKPOINT
model_cfg = MODEL_CFG

sam2_model = build_sam2(model_cfg, sam2_checkpoint, device=device)
'''

SAM2_PREDICTOR_NOTEBOOK = '''
# select the device for computation
if torch.cuda.is_available():
    device = torch.device("cuda")
elif torch.backends.mps.is_available():
    device = torch.device("mps")
else:
    device = torch.device("cpu")
print(f"using device: {{device}}")

np.random.seed(3)

image = Image.open('images/truck.jpg')
image = np.array(image.convert("RGB"))

plt.figure(figsize=(10, 10))
plt.imshow(image)
plt.axis('on')
plt.show()

{LOAD}
predictor = SAM2ImagePredictor(sam2_model)

predictor.set_image(image)

input_point = np.array([[500, 375]])
input_label = np.array([1])

plt.figure(figsize=(10, 10))
plt.imshow(image)
show_points(input_point, input_label, plt.gca())
plt.axis('on')
plt.show()

print(predictor._features["image_embed"].shape, predictor._features["image_embed"][-1].shape)

masks, scores, logits = predictor.predict(
    point_coords=input_point,
    point_labels=input_label,
    multimask_output=True,
)
sorted_ind = np.argsort(scores)[::-1]
masks = masks[sorted_ind]
scores = scores[sorted_ind]
logits = logits[sorted_ind]

masks.shape  # (number_of_masks) x H x W

show_masks(image, masks, scores, point_coords=input_point, input_labels=input_label, borders=True)

input_point = np.array([[500, 375], [1125, 625]])
input_label = np.array([1, 1])

mask_input = logits[np.argmax(scores), :, :]  # Choose the model's best mask

masks, scores, _ = predictor.predict(
    point_coords=input_point,
    point_labels=input_label,
    mask_input=mask_input[None, :, :],
    multimask_output=False,
)

masks.shape

show_masks(image, masks, scores, point_coords=input_point, input_labels=input_label)

input_point = np.array([[500, 375], [1125, 625]])
input_label = np.array([1, 0])

mask_input = logits[np.argmax(scores), :, :]  # Choose the model's best mask

masks, scores, _ = predictor.predict(
    point_coords=input_point,
    point_labels=input_label,
    mask_input=mask_input[None, :, :],
    multimask_output=False,
)

show_masks(image, masks, scores, point_coords=input_point, input_labels=input_label)

input_box = np.array([425, 600, 700, 875])

masks, scores, _ = predictor.predict(
    point_coords=None,
    point_labels=None,
    box=input_box[None, :],
    multimask_output=False,
)

show_masks(image, masks, scores, box_coords=input_box)

input_box = np.array([425, 600, 700, 875])
input_point = np.array([[575, 750]])
input_label = np.array([0])

masks, scores, logits = predictor.predict(
    point_coords=input_point,
    point_labels=input_label,
    box=input_box,
    multimask_output=False,
)

show_masks(image, masks, scores, box_coords=input_box, point_coords=input_point, input_labels=input_label)

input_boxes = np.array([
    [75, 275, 1725, 850],
    [425, 600, 700, 875],
    [1375, 550, 1650, 800],
    [1240, 675, 1400, 750],
])

masks, scores, _ = predictor.predict(
    point_coords=None,
    point_labels=None,
    box=input_boxes,
    multimask_output=False,
)

masks.shape  # (batch_size) x (num_predicted_masks_per_input) x H x W

plt.figure(figsize=(10, 10))
plt.imshow(image)
for mask in masks:
    show_mask(mask.squeeze(0), plt.gca(), random_color=True)
for box in input_boxes:
    show_box(box, plt.gca())
plt.axis('off')
plt.show()

image1 = image  # truck.jpg from above
image1_boxes = np.array([
    [75, 275, 1725, 850],
    [425, 600, 700, 875],
    [1375, 550, 1650, 800],
    [1240, 675, 1400, 750],
])

image2 = Image.open('images/groceries.jpg')
image2 = np.array(image2.convert("RGB"))
image2_boxes = np.array([
    [450, 170, 520, 350],
    [350, 190, 450, 350],
    [500, 170, 580, 350],
    [580, 170, 640, 350],
])

img_batch = [image1, image2]
boxes_batch = [image1_boxes, image2_boxes]

predictor.set_image_batch(img_batch)

masks_batch, scores_batch, _ = predictor.predict_batch(
    None,
    None,
    box_batch=boxes_batch,
    multimask_output=False
)

for image, boxes, masks in zip(img_batch, boxes_batch, masks_batch):
    plt.figure(figsize=(10, 10))
    plt.imshow(image)
    for mask in masks:
        show_mask(mask.squeeze(0), plt.gca(), random_color=True)
    for box in boxes:
        show_box(box, plt.gca())
    plt.axis('off')
    plt.show()

image1 = image  # truck.jpg from above
image1_pts = np.array([
    [[500, 375]],
    [[650, 750]]
    ]) # Bx1x2 where B corresponds to number of objects
image1_labels = np.array([[1], [1]])

image2_pts = np.array([
    [[400, 300]],
    [[630, 300]],
])
image2_labels = np.array([[1], [1]])

pts_batch = [image1_pts, image2_pts]
labels_batch = [image1_labels, image2_labels]

masks_batch, scores_batch, _ = predictor.predict_batch(pts_batch, labels_batch, box_batch=None, multimask_output=True)

# Select the best single mask per object
best_masks = []
for masks, scores in zip(masks_batch,scores_batch):
    best_masks.append(masks[range(len(masks)), np.argmax(scores, axis=-1)])

for image, points, labels, masks in zip(img_batch, pts_batch, labels_batch, best_masks):
    plt.figure(figsize=(10, 10))
    plt.imshow(image)
    for mask in masks:
        show_mask(mask, plt.gca(), random_color=True)
    show_points(points, labels, plt.gca())
    plt.axis('off')
    plt.show()
'''


# ---- the display stand-ins and the runs -------------------------------------------------

class _Axes:
  def __getattr__(self, name):
    return lambda *a, **k: None


class _Plt:
  """`matplotlib.pyplot` stand-in: every call does nothing."""

  def subplots(self, nrows=1, ncols=1, **kwargs):
    return None, [_Axes() for _ in range(nrows * ncols)]

  def gca(self):
    return _Axes()

  def __getattr__(self, name):
    return lambda *a, **k: None


def _display_helpers(shown):
  """The notebooks' show_* helpers, recording what they would draw."""

  def show_mask(mask, ax, random_color=False, borders=True):
    shown.append(("mask", np.array(mask)))

  def show_points(coords, labels, ax, marker_size=375):
    shown.append(("points", np.array(coords), np.array(labels)))

  def show_box(box, ax):
    shown.append(("box", np.array(box)))

  def show_masks(image, masks, scores, point_coords=None, box_coords=None, input_labels=None,
                 borders=True):
    for mask, score in zip(masks, scores):
      show_mask(mask, None, borders=borders)
      shown.append(("score", float(score)))

  return dict(show_mask=show_mask, show_points=show_points, show_box=show_box,
              show_masks=show_masks)


def _run(code, names):
  """Runs notebook code; -> (what it displayed, its final variables)."""
  from PIL import Image
  shown = []
  g = dict(np=np, torch=torch, cv2=cv2, Image=Image, plt=_Plt(), __name__="notebook")
  g.update(_display_helpers(shown))
  g.update(names)
  exec(compile(code, "notebook", "exec"), g)
  return shown, g


def _as_np(x):
  return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _compare(want, got):
  """What both runs displayed, in order, and agree to TOL (masks to FLIP)."""
  shown_w, shown_g = want[0], got[0]
  assert [s[0] for s in shown_g] == [s[0] for s in shown_w]
  n_masks = 0
  for w, g in zip(shown_w, shown_g):
    if w[0] == "mask":
      assert g[1].shape == w[1].shape, (g[1].shape, w[1].shape)
      assert np.mean(g[1].astype(bool) != w[1].astype(bool)) < FLIP
      n_masks += 1
      assert 0 < w[1].astype(bool).mean() < 1 or w[1].size < 10  # a real mask
    elif w[0] == "score":
      assert abs(g[1] - w[1]) < TOL * max(1.0, abs(w[1]))
    else:
      np.testing.assert_allclose(np.asarray(g[1], np.float64), np.asarray(w[1], np.float64))
  return n_masks


def _images(folder, truck=(1200, 1800), groceries=(1000, 1200), seed=0):
  """Pictures of a few flat discs at the notebooks' image sizes, as images/*.jpg (PNG data,
  so both readers see the same pixels)."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  for name, (h, w) in (("truck", truck), ("groceries", groceries)):
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w, 3), 40, np.uint8)
    for _ in range(12):
      cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
      img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    ok, data = cv2.imencode(".png", img[..., ::-1])
    assert ok
    with open(os.path.join(folder, "images", f"{name}.jpg"), "wb") as f:
      f.write(data.tobytes())


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
  _images(str(tmp_path))
  monkeypatch.chdir(tmp_path)
  return tmp_path


def _sam_official_names():
  modeling, predictor = ref.official()
  import segment_anything.build_sam as build_sam
  import segment_anything.utils.transforms  # noqa: F401  (for the notebook's import line)
  return dict(sam_model_registry=build_sam.sam_model_registry,
              SamPredictor=predictor.SamPredictor)


def test_sam_predictor_notebook(in_tmp):
  """predictor_example on the tiny SAM saved as a .pth: points, a mask input, a (1, 4) box,
  a box with a point, four boxes through apply_boxes_torch / predict_torch, and the
  batched `sam(batched_input)` over two images."""
  tsam = ref.build_torch_sam(SAM_PRESETS["tiny"], seed=4)
  pth = in_tmp / "sam_tiny.pth"
  ref.save_state_dict(tsam, pth)
  from fusionsam_jax.models.sam.build import load_sam
  load = 'device = "cpu"\nsam = SAM_MODEL\n'
  with torch.no_grad():
    want = _run(SAM_IMPORTS_OFFICIAL + SAM_PREDICTOR_NOTEBOOK.format(LOAD=load,
                                                                    RLS=SAM_RLS_OFFICIAL),
                dict(_sam_official_names(), SAM_MODEL=tsam))
  with jax.default_matmul_precision("highest"):
    got = _run(SAM_IMPORTS_OURS + SAM_PREDICTOR_NOTEBOOK.format(LOAD=load, RLS=SAM_RLS_OURS),
               dict(SAM_MODEL=load_sam(str(pth))))
  assert _compare(want, got) == 3 + 1 + 1 + 1 + 1 + 4 + 8
  for w, g in zip(want[1]["batched_output"], got[1]["batched_output"]):
    assert sorted(g) == sorted(w) == ["iou_predictions", "low_res_logits", "masks"]
    for k in w:
      assert isinstance(g[k], torch.Tensor) and g[k].shape == w[k].shape
      if k != "masks":
        assert ref.rel_err(_as_np(g[k]), _as_np(w[k])) < TOL


def _sam2_official_names(tm):
  _, ip = ref2.official()
  s = tm.image_size

  class SAM2ImagePredictor(ip.SAM2ImagePredictor):
    """The official predictor; feature sizes set for the tiny model's image size."""

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]

  return dict(SAM2ImagePredictor=SAM2ImagePredictor)


def test_sam2_image_predictor_notebook(in_tmp):
  """image_predictor_example on the tiny SAM 2 saved as a .pt: points, a mask input, a
  (1, 4) box, a box with a point, four boxes, and predict_batch over two images (boxes, then
  points)."""
  tm = ref2.build_torch_sam2("tiny", seed=4)
  pt = in_tmp / "sam2_tiny.pt"
  ref2.save_checkpoint(tm, pt)
  with torch.no_grad():
    want = _run(SAM2_PREDICTOR_NOTEBOOK.format(LOAD="sam2_model = SAM2_MODEL\n"),
                dict(_sam2_official_names(tm), SAM2_MODEL=tm))
  load = 'sam2_model = build_sam2("tiny", SAM2_CHECKPOINT, device=device)\n'
  with jax.default_matmul_precision("highest"):
    got = _run(SAM2_IMPORTS_OURS + SAM2_PREDICTOR_NOTEBOOK.format(LOAD=load),
               dict(SAM2_CHECKPOINT=str(pt)))
  assert _compare(want, got) == 3 + 1 + 1 + 1 + 1 + 4 + 8 + 4
  for k in ("masks_batch", "scores_batch"):
    for w, g in zip(want[1][k], got[1][k]):
      assert g.shape == w.shape
  for w, g in zip(want[1]["scores_batch"], got[1]["scores_batch"]):
    assert ref.rel_err(g, w) < TOL


@pytest.mark.extended
def test_sam_predictor_notebook_vit_b(in_tmp):
  """predictor_example with its own loading lines: sam_model_registry["vit_b"] on a random
  official vit_b saved as a .pth."""
  tsam = ref.build_torch_sam(SAM_PRESETS["vit_b"], seed=4)
  pth = str(in_tmp / "sam_vit_b.pth")
  ref.save_state_dict(tsam, pth)
  consts = dict(SAM_CHECKPOINT=pth, MODEL_TYPE="vit_b")
  with torch.no_grad():
    want = _run(SAM_PREDICTOR_NOTEBOOK.format(LOAD=SAM_LOAD_RELEASED, RLS=SAM_RLS_OFFICIAL),
                dict(_sam_official_names(), **consts))
  with jax.default_matmul_precision("highest"):
    got = _run(SAM_IMPORTS_OURS + SAM_PREDICTOR_NOTEBOOK.format(LOAD=SAM_LOAD_RELEASED,
                                                               RLS=SAM_RLS_OURS), consts)
  assert _compare(want, got) == 19


@pytest.mark.extended
def test_sam2_image_predictor_notebook_hiera_t(in_tmp):
  """image_predictor_example with its own loading lines: build_sam2 on the sam2.1 hiera_t
  config and a random official hiera_t saved as a .pt."""
  tm = ref2.build_torch_sam2("hiera_t", seed=4)
  pt = str(in_tmp / "sam2.1_hiera_tiny.pt")
  ref2.save_checkpoint(tm, pt)
  build_sam, ip = ref2.official()
  consts = dict(SAM2_CHECKPOINT=pt, MODEL_CFG="configs/sam2.1/sam2.1_hiera_t.yaml")
  with torch.no_grad():
    want = _run(SAM2_PREDICTOR_NOTEBOOK.format(LOAD=SAM2_LOAD_RELEASED),
                dict(build_sam2=build_sam.build_sam2,
                     SAM2ImagePredictor=ip.SAM2ImagePredictor, **consts))
  with jax.default_matmul_precision("highest"):
    got = _run(SAM2_IMPORTS_OURS + SAM2_PREDICTOR_NOTEBOOK.format(LOAD=SAM2_LOAD_RELEASED),
               consts)
  assert _compare(want, got) == 23
