# Sourced by the GPU scripts (repository root): makes `packed_vit` importable on the device machine without an
# install. `pip install -e .` fails there (no network for setuptools' build environment), so setup.py's package_dir
# mapping is rebuilt as links under /tmp/pv. Also the environment every GPU run wants.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast (device README)
if ! python3 -c "import packed_vit" 2>/dev/null; then
    mkdir -p /tmp/pv/packed_vit && cp -r src/packed_vit/. /tmp/pv/packed_vit/
    for sub in modeling configuration processing; do ln -sfn "$PWD/$sub" /tmp/pv/packed_vit/$sub; done
    export PYTHONPATH=/tmp/pv${PYTHONPATH:+:$PYTHONPATH}
fi
