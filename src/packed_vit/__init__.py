"""packed-vit: packed (NaViT-style) Siglip2-NaFlex and AIMv2 vision towers for Hugging Face transformers.

Importing the package registers the configs, models and image processors with AutoConfig / AutoModel /
AutoImageProcessor. `replace_vision_towers(model)` swaps transformers' towers inside a model (e.g. a VLM) for these.
"""

from transformers import AutoConfig, AutoModel

from .configuration import Aimv2PackingVisionConfig, Siglip2PackingVisionConfig
from .modeling import AIMv2Packing, Aimv2PackingVisionModel, Siglip2NaflexPacking, Siglip2PackingVisionModel
from .processing import Aimv2PackingImageProcessor, Siglip2PackingImageProcessor, register_image_processor
from .drop_in import replace_vision_towers

__version__ = "0.1.0"

for _config, _model, _processor in (
    (Siglip2PackingVisionConfig, Siglip2PackingVisionModel, Siglip2PackingImageProcessor),
    (Aimv2PackingVisionConfig, Aimv2PackingVisionModel, Aimv2PackingImageProcessor),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    register_image_processor(_config, _processor)

__all__ = [
    "AIMv2Packing",
    "Aimv2PackingImageProcessor",
    "Aimv2PackingVisionConfig",
    "Aimv2PackingVisionModel",
    "Siglip2NaflexPacking",
    "Siglip2PackingImageProcessor",
    "Siglip2PackingVisionConfig",
    "Siglip2PackingVisionModel",
    "replace_vision_towers",
]
