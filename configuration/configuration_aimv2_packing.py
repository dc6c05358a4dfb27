"""Config of the packed AIMv2 vision tower.

Field names and defaults are those of transformers' `Aimv2VisionConfig`, plus how learned position tables
serve grids other than the one they were trained on. Classic `__init__` so that the file runs as remote
code on transformers 4.57 and 5.x.
"""

from transformers import PretrainedConfig


class Aimv2PackingVisionConfig(PretrainedConfig):
    model_type = "aimv2_packing_vision"

    def __init__(
        self,
        hidden_size: int = 1024,
        intermediate_size: int = 2816,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 8,
        num_channels: int = 3,
        image_size: int = 224,
        patch_size: int = 14,
        hidden_act: str = "silu",
        attention_dropout: float = 0.0,
        rms_norm_eps: float = 1e-5,
        qkv_bias: bool = False,
        mlp_bias: bool = False,
        initializer_range: float = 0.02,
        use_head: bool = True,
        is_native: bool = False,
        position_resize_mode: str | None = "bicubic",
        **kwargs,
    ):
        """
        position_resize_mode: how a learned-position checkpoint (`is_native=False`) serves a grid other than
            its trained `image_size // patch_size` square: an `F.interpolate` mode (`"bicubic"`, antialiased,
            as timm's `resample_abs_pos_embed`; or `"bilinear"`), or `None` to refuse such grids.
        """
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.attention_dropout = attention_dropout
        self.rms_norm_eps = rms_norm_eps
        self.qkv_bias = qkv_bias
        self.mlp_bias = mlp_bias
        self.initializer_range = initializer_range
        self.use_head = use_head
        self.is_native = is_native
        self.position_resize_mode = position_resize_mode
        super().__init__(**kwargs)
