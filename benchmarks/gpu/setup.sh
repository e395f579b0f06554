# Sourced first on the device machine (repo root, `.whl` carried): installs the wheels of
# benchmarks/gpu/wheels.sh beside the image's packages, sets PYTHONPATH, prints the device.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl .whl/sam2/sam2-*.whl > /dev/null 2>&1 || echo "wheel install failed"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, torch, sam2, grain, ml_collections, portpicker; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)" 2>&1 | tail -1
