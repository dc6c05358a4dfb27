from .modeling_aimv2_packing import AIMv2Packing, Aimv2PackingVisionModel
from .modeling_siglip2_packing import Siglip2NaflexPacking, Siglip2PackingVisionModel

__all__ = ["AIMv2Packing", "Aimv2PackingVisionModel", "Siglip2NaflexPacking", "Siglip2PackingVisionModel"]
