"""Packed image processors: images of any size -> packed `pixel_values [N, p*p*C]` + `grid_thw`."""

import inspect

from transformers import AutoImageProcessor

from .image_processing_aimv2_packing import Aimv2PackingImageProcessor
from .image_processing_siglip2_packing import Siglip2PackingImageProcessor


def register_image_processor(config_class, processor_class) -> None:
    """Registers a (numpy / PIL) image processor for a config class with AutoImageProcessor.

    The signature differs between versions: transformers 4.57 takes `slow_image_processor_class=` (its second
    positional argument is the deprecated `image_processor_class`), 5.x takes `image_processor_classes={"pil": ...}`
    and keeps `slow_image_processor_class=` only as a deprecated alias. Use the current form where it exists.
    """
    if "image_processor_classes" in inspect.signature(AutoImageProcessor.register).parameters:
        AutoImageProcessor.register(config_class, image_processor_classes={"pil": processor_class}, exist_ok=True)
    else:
        AutoImageProcessor.register(config_class, slow_image_processor_class=processor_class, exist_ok=True)


__all__ = ["Aimv2PackingImageProcessor", "Siglip2PackingImageProcessor", "register_image_processor"]
