"""Writers of every checkpoint format of DESIGN §4, from a reference pair of tests/reference.py, as their makers
write them: transformers' own `save_pretrained` where transformers makes the format, and Apple's original layout
written from DESIGN §4's table (conversion_aimv2.APPLE_ORIGINAL_NAMES, read in reverse).

Each writer is `write(ref, ours, folder)`: `ref` the transformers reference tower, `ours` our model holding the same
weights (its state dict is the canonical one on every transformers version). The google/siglip2 and Apple original
writers live in the package (`packed_vit.original_checkpoints`), which the demo uses too.
"""

import json
import shutil
from pathlib import Path

import torch
from transformers import Aimv2Config, Aimv2Model

from packed_vit.original_checkpoints import (
    TINY_TEXT,
    apple_config,
    save_config,
    save_weights,
    to_apple_original,
    write_apple_original,
    write_siglip2_full_model,
)

REPO = Path(__file__).resolve().parent.parent


# ---- transformers' own formats ----------------------------------------------------------------------------------


def vision_model(ref, ours, folder):
    """`Siglip2VisionModel` / `Aimv2VisionModel.save_pretrained`."""
    ref.save_pretrained(folder)


def vision_model_prefixed(ref, ours, folder):
    """A vision model saved with `vision_model.`-prefixed keys, as transformers 4.x saves `Siglip2VisionModel`."""
    ref.config.save_pretrained(folder)
    save_weights({f"vision_model.{k}": v for k, v in ours.state_dict().items()}, folder)


def sharded(ref, ours, folder):
    """`save_pretrained` in small shards: `model.safetensors.index.json` + shard files."""
    ref.save_pretrained(folder, max_shard_size="20KB")
    assert (Path(folder) / "model.safetensors.index.json").exists()


def pickle_bin(ref, ours, folder):
    """An old-style `pytorch_model.bin` (+ config.json)."""
    ref.config.save_pretrained(folder)
    torch.save(ours.state_dict(), Path(folder) / "pytorch_model.bin")


def packed_round_trip(ref, ours, folder):
    """This project's own `save_pretrained` (model_type `*_packing_vision`)."""
    ours.save_pretrained(folder)


def exported_remote_code(ref, ours, folder):
    """This project's Hub export (DESIGN §5), minimally: our save, the code files flat with single-dot imports, and
    `auto_map` so that `AutoModel.from_pretrained(folder, trust_remote_code=True)` runs our `from_pretrained`."""
    ours.save_pretrained(folder)
    code = [f for f in [*REPO.glob("modeling/*.py"), *REPO.glob("configuration/*.py")] if f.name != "__init__.py"]
    for file in code:
        (Path(folder) / file.name).write_text(file.read_text().replace("from ..configuration.", "from ."))
    config = json.loads((Path(folder) / "config.json").read_text())
    tower = config["model_type"].removesuffix("_packing_vision")  # aimv2, siglip2
    config["auto_map"] = {
        "AutoConfig": f"configuration_{tower}_packing.{type(ours.config).__name__}",
        "AutoModel": f"modeling_{tower}_packing.{type(ours).__name__}",
    }
    save_config(config, folder)


def siglip2_full_model(ref, ours, folder):
    """google/siglip2-*-naflex: a whole `Siglip2Model` (vision + text tower, logit scale and bias)."""
    write_siglip2_full_model(ref.config, ours.state_dict(), folder)


def aimv2_lit_model(ref, ours, folder):
    """apple/aimv2-*-lit at current main: a whole `Aimv2Model` (vision + text tower, projections, logit scale)."""
    full = Aimv2Model(Aimv2Config(vision_config=ref.config.to_dict(), text_config=TINY_TEXT))
    full.vision_model.load_state_dict(ours.state_dict())
    full.save_pretrained(folder)


# ---- Apple's original AIMv2 layout (the pinned revisions) -------------------------------------------------------


def apple_original(ref, ours, folder):
    """apple/aimv2-* original (224/336/448, or native without `pos_embed`): flat config, `preprocessor.*`/`trunk.*`."""
    write_apple_original(ref.config, ours.state_dict(), folder)


def apple_original_lit(ref, ours, folder):
    """apple/aimv2-*-lit original: Apple's vision/text configs nested, the tower (with its head) under
    `image_encoder.`, and the text tower, projections and logit scale beside it."""
    text = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_context_length": 8, "model_type": "aimv2"}  # fmt: skip
    vision = {**apple_config(ref.config), "num_queries": 1}
    save_config({"model_type": "aimv2", "architectures": ["AIMv2Model"], "projection_dim": 16,
                 "vision_config": vision, "text_config": text}, folder)  # fmt: skip
    tensors = {f"image_encoder.{k}": v for k, v in to_apple_original(ours.state_dict()).items()}
    tensors.update({
        "text_encoder.preprocessor.text_embedding.weight": torch.randn(64, 32),
        "text_encoder.preprocessor.positional_embedding": torch.randn(8, 32),
        "text_encoder.trunk.blocks.0.attn.qkv.weight": torch.randn(96, 32),
        "text_encoder.trunk.post_trunk_norm.weight": torch.randn(32),
        "image_projector.weight": torch.randn(16, ref.config.hidden_size),
        "text_projector.weight": torch.randn(16, 32),
        "log_logit_scale": torch.tensor(2.6592),
    })  # fmt: skip
    save_weights(tensors, folder)


# ---- the Hub cache -----------------------------------------------------------------------------------------------


def put_in_hub_cache(cache_dir, repo_id: str, folder, commit: str, main: bool = True) -> None:
    """`folder` as snapshot `commit` of model repo `repo_id` in an HF hub cache (the layout huggingface_hub reads
    offline: models--org--name/snapshots/<commit>/..., refs/main)."""
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    if main:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
