"""Config of the packed Siglip2-NaFlex vision tower.

Field names and defaults are those of transformers' `Siglip2VisionConfig`, so a Siglip2 vision config dict
loads as is. Written as a classic `__init__` (not the dataclass style of transformers 5) so that the same
file runs as remote code on transformers 4.57 and 5.x.
"""

from transformers import PretrainedConfig


class Siglip2PackingVisionConfig(PretrainedConfig):
    model_type = "siglip2_packing_vision"

    def __init__(
        self,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_channels: int = 3,
        patch_size: int = 16,
        hidden_act: str = "gelu_pytorch_tanh",
        layer_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        vision_use_head: bool = True,
        num_patches: int = 256,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.vision_use_head = vision_use_head
        self.num_patches = num_patches
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @property
    def use_head(self) -> bool:
        # AIMv2 and most vision configs call it `use_head`; Siglip2 calls it `vision_use_head`.
        return self.vision_use_head
