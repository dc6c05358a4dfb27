from .configuration_aimv2_packing import Aimv2PackingVisionConfig
from .configuration_siglip2_packing import Siglip2PackingVisionConfig

__all__ = ["Aimv2PackingVisionConfig", "Siglip2PackingVisionConfig"]
