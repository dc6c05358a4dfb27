#!/usr/bin/env bash
# Issue 26's "Done when" on the GPU machine: `packed-vit check` in bf16 on an so400m-sized random checkpoint in
# google's format (a full Siglip2Model: model_type siglip2, vision_model.* beside a small text tower, with
# google/siglip2-*-patch16-naflex's processor settings), every attention backend available there, and the CUDA-graph
# path. Its table and JSON are what benchmarks/RESULTS.md records.
# Usage (repo root): bash benchmarks/check_so400m.sh [WORK_DIR]   (default /tmp/check_so400m; exit status: check's)
set -euo pipefail
work=${1:-/tmp/check_so400m}
source benchmarks/device_env.sh

python3 - "$work/siglip2_so400m" <<'EOF'
import sys
from pathlib import Path

import torch
from transformers import Siglip2VisionConfig, Siglip2VisionModel

from packed_vit.demo import SIGLIP2_PROCESSOR, ReferenceSiglip2Processor
from packed_vit.modeling.conversion_siglip2 import convert_siglip2_state_dict
from packed_vit.original_checkpoints import perturb_, write_siglip2_full_model

folder = Path(sys.argv[1])
if not (folder / "model.safetensors").is_file():
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vision = Siglip2VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                 patch_size=16, num_patches=256, vision_use_head=True)
    with torch.device("cuda"):  # the init of 400M parameters, fast
        tower = perturb_(Siglip2VisionModel(vision), 0.01)  # off the init, as tests/test_cuda.py's so400m
    weights = {name: tensor.cpu() for name, tensor in convert_siglip2_state_dict(tower.state_dict()).items()}
    write_siglip2_full_model(vision, weights, folder)
    ReferenceSiglip2Processor(**SIGLIP2_PROCESSOR).save_pretrained(folder)
print(f"checkpoint: {folder}")
EOF

python3 -m packed_vit check --model "$work/siglip2_so400m" --device cuda --dtype bfloat16 --cuda-graphs \
    --json "$work/check_so400m.json" | tee "$work/check_so400m.txt"
