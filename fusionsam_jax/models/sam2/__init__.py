"""SAM 2 (image path) in Flax; see `sam2.py`."""
