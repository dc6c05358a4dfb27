"""packed-vit: packed (NaViT-style) Siglip2-NaFlex and AIMv2 vision towers for Hugging Face transformers.

Importing the package registers the configs and models with AutoConfig / AutoModel.
"""

from transformers import AutoConfig, AutoModel

from .configuration import Aimv2PackingVisionConfig, Siglip2PackingVisionConfig
from .modeling import AIMv2Packing, Aimv2PackingVisionModel, Siglip2NaflexPacking, Siglip2PackingVisionModel

__version__ = "0.1.0"

for _config, _model in (
    (Siglip2PackingVisionConfig, Siglip2PackingVisionModel),
    (Aimv2PackingVisionConfig, Aimv2PackingVisionModel),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)

__all__ = [
    "AIMv2Packing",
    "Aimv2PackingVisionConfig",
    "Aimv2PackingVisionModel",
    "Siglip2NaflexPacking",
    "Siglip2PackingVisionConfig",
    "Siglip2PackingVisionModel",
]
