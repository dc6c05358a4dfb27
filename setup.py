"""Installs `packed_vit`.

The repository keeps the layout of the design card (`modeling/`, `configuration/`, `processing/` at the top
level, so each can be copied flat into a Hub repo), and `package_dir` maps them under the one import name
`packed_vit`: `packed_vit.modeling`, `packed_vit.configuration`, `packed_vit.processing`.
"""

from setuptools import setup

setup(
    name="packed-vit",
    version="0.1.0",
    description="Packed (NaViT-style, variable resolution, no padding) Siglip2-NaFlex and AIMv2 vision towers",
    python_requires=">=3.10",
    packages=[
        "packed_vit",
        "packed_vit.encode",
        "packed_vit.modeling",
        "packed_vit.configuration",
        "packed_vit.processing",
    ],
    package_dir={
        "packed_vit": "src/packed_vit",
        "packed_vit.modeling": "modeling",
        "packed_vit.configuration": "configuration",
        "packed_vit.processing": "processing",
    },
    # transformers: 4.57 (the oldest supported; .ci/run tests it) up to the latest release (the README test command).
    install_requires=["torch>=2.4", "transformers>=4.57", "safetensors", "huggingface_hub", "numpy", "pillow"],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "flash4": ["flash-attn-4>=4.0.0b36"],
        "encode": ["webdataset>=0.2"],
        # the GPU's hardware JPEG engines (--jpeg-decoder nvimgcodec); for CUDA 12: nvidia-nvimgcodec-cu12[nvjpeg]
        "nvimgcodec": ["nvidia-nvimgcodec-cu13[nvjpeg]>=0.9"],
        "test": ["pytest", "scikit-image", "webdataset>=0.2", "peft>=0.17"],
    },
    entry_points={"console_scripts": ["packed-vit=packed_vit.cli:main"]},
)
