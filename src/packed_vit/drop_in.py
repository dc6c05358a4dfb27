"""`replace_vision_towers(model)`: the packed towers in place of transformers' own inside any model (e.g. a VLM).

The pattern of Liger-Kernel's `apply_liger_kernel_to_*`: in place, idempotent, returns what it changed, no copy of
the weights. Each `Siglip2VisionModel` / `Aimv2VisionModel` inside `model` is swapped for the packed tower built
around the SAME Parameter objects (an optimizer built before keeps stepping them), on their device and dtype, in the
tower's train/eval mode and gradient-checkpointing state. The client keeps calling it as before: the packed towers
take the reference towers' own calls (modeling/reference_calls.py) and return the same values.

State-dict keys do not change, so a model saved after the swap loads into the unpatched model and back:
- transformers 5 `Siglip2VisionModel` and every `Aimv2VisionModel` hold the tower's modules themselves (keys
  `embeddings.*`, `encoder.*`, ...): the whole module is swapped.
- transformers 4.57's `Siglip2VisionModel` wraps them in `.vision_model` (`Siglip2VisionTransformer`, keys
  `vision_model.*`) and only forwards its call, renaming `pixel_attention_mask` to `attention_mask`: the inner
  module is swapped and the wrapper, which has no weights of its own, stays.

Attention: the reference's `_attn_implementation` says how to run a padded, masked batch. The packed tower runs the
same attention on the real tokens only, with its own backends: "flash_attention_2" stays flash-attn when that
package is installed; anything else ("sdpa", "eager", "flex_attention", hub kernels) becomes "auto", i.e. torch's
varlen flash kernel on CUDA fp16/bf16 and SDPA otherwise, which compute the same function (DESIGN §7, parity-tested).
Keeping "eager" would only make the packed tower slower; the user swaps towers for speed.

`cuda_graphs=True` calls `enable_cuda_graphs()` (modeling/cuda_graphs.py) on every packed tower of the model: a
VLM's prefill runs its tower on a few images, a batch bound by the host's kernel launches, which a replayed graph
removes (issue 25: an 8-image LFM2-VL tower on an H200 25.3 ms -> 23.5 ms packed, 7.5 ms with graphs; docs/vlm.md,
`benchmarks/bench_vlm.py`'s "graphs" side). The graphs are used where they apply, inference on CUDA with the
`varlen_attn` backend, and the tower runs eagerly otherwise, with the same outputs: on the CPU, in training, above
`max_tokens`. So on a model still on the CPU the option attaches the graph runner, which takes effect once the model
is moved to CUDA.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Aimv2VisionModel, Siglip2VisionModel

from .configuration import Aimv2PackingVisionConfig, Siglip2PackingVisionConfig
from .modeling import Aimv2PackingVisionModel, Siglip2PackingVisionModel
from .modeling.attention import ATTENTION_BACKENDS, check_attn_implementation
from .modeling.conversion_aimv2 import convert_aimv2_config
from .modeling.conversion_siglip2 import convert_siglip2_config

PACKED_TOWERS = (Siglip2PackingVisionModel, Aimv2PackingVisionModel)

# reference class -> (packed class, its config class, the config conversion of from_pretrained)
REPLACEMENTS = {
    Siglip2VisionModel: (Siglip2PackingVisionModel, Siglip2PackingVisionConfig, convert_siglip2_config),
    Aimv2VisionModel: (Aimv2PackingVisionModel, Aimv2PackingVisionConfig, convert_aimv2_config),
}


def replace_vision_towers(model: nn.Module, cuda_graphs: bool = False) -> int:
    """Swaps every `Siglip2VisionModel` / `Aimv2VisionModel` inside `model` for the packed tower, in place.

    Returns how many towers it replaced (0 when called again: already-packed towers are left alone). Raises
    ValueError, naming the tower, for one the packed tower cannot take (e.g. attention_dropout > 0); towers are
    checked and built before any is swapped, so on an error `model` is unchanged.

    cuda_graphs: also enable CUDA-graph replay of small inference batches on every packed tower of `model` (those
    swapped now and before; one whose graphs are on keeps its settings). Used on CUDA only (see the module doc); for
    other limits call `tower.enable_cuda_graphs(max_tokens=...)` yourself.
    """
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
    swaps = []  # (parent module, attribute name, packed tower)
    for path, module in model.named_modules():
        reference_class = next((cls for cls in REPLACEMENTS if isinstance(module, cls)), None)
        if reference_class is None:
            continue
        parent, attribute, tower = _swappable_tower(model, path, module)
        if isinstance(tower, PACKED_TOWERS):
            continue  # replaced before
        where = f"{path or 'model'} ({type(module).__name__})"
        if parent is None:
            raise ValueError(
                f"{where} is the model itself: call replace_vision_towers on the model that holds it, or load the "
                f"packed tower directly ({REPLACEMENTS[reference_class][0].__name__}.from_pretrained)"
            )
        try:
            swaps.append((parent, attribute, packed_tower_sharing_parameters(tower, *REPLACEMENTS[reference_class])))
        except ValueError as error:
            raise ValueError(f"Cannot replace the vision tower {where} with the packed tower: {error}") from None
    for parent, attribute, packed in swaps:
        setattr(parent, attribute, packed)
    if cuda_graphs:
        for module in model.modules():
            if isinstance(module, PACKED_TOWERS) and module.cuda_graphs is None:
                module.enable_cuda_graphs()
    return len(swaps)


def _swappable_tower(model: nn.Module, path: str, reference: nn.Module) -> tuple[nn.Module | None, str, nn.Module]:
    """(parent, attribute, module) of the module to swap for the reference tower at `path` (see the module doc)."""
    inner = getattr(reference, "vision_model", None)
    if isinstance(inner, nn.Module):  # transformers 4.57's Siglip2VisionModel: swap the wrapped tower
        return reference, "vision_model", inner
    parent_path, _, attribute = path.rpartition(".")
    parent = model.get_submodule(parent_path) if path else None
    return parent, attribute, reference


def packed_tower_sharing_parameters(tower: nn.Module, packed_class, config_class, convert_config) -> nn.Module:
    """The packed tower holding `tower`'s own Parameter objects (no copy), in its mode and checkpointing state."""
    adapter_layers = [name for name, module in tower.named_modules() if type(module).__module__.startswith("peft.")]
    if adapter_layers:
        raise ValueError(
            f"it holds adapter layers (PEFT: {', '.join(adapter_layers[:3])}, ...): replace the towers first, then "
            "attach the adapters (get_peft_model / PeftModel.from_pretrained), which wrap the packed tower's layers "
            "as they wrap transformers' (the same module names)"
        )
    reference_config = tower.config
    # What from_pretrained does with a checkpoint (AIMv2 reads some fields off the weight names)
    config = config_class(**convert_config(reference_config.to_dict(), [name for name, _ in tower.named_parameters()]))
    config._attn_implementation = packed_attention_for(getattr(reference_config, "_attn_implementation", None))
    with torch.device("meta"):  # modules only: every parameter is the reference's own, set below
        packed = packed_class(config)
    _share_parameters(tower, packed)
    packed.train(tower.training)
    _copy_gradient_checkpointing(tower, packed)
    return packed


def packed_attention_for(reference_attn_implementation: str | None) -> str:
    """Our backend for the reference's `_attn_implementation` (the module doc says why)."""
    if reference_attn_implementation in ATTENTION_BACKENDS and reference_attn_implementation.startswith("flash"):
        try:
            return check_attn_implementation(reference_attn_implementation)
        except ValueError:  # the flash package is not installed here
            return "auto"
    return "auto"


def _share_parameters(tower: nn.Module, packed: nn.Module) -> None:
    reference_parameters = dict(tower.named_parameters())
    devices = {parameter.device for parameter in reference_parameters.values()}
    if len(devices) > 1 or any(device.type == "meta" for device in devices):
        # accelerate's offloading / multi-device dispatch moves weights in hooks on the submodules, which a new
        # module tree would not have
        raise ValueError(
            f"its weights are offloaded or spread over devices ({sorted(map(str, devices))}): load the model with "
            "the vision tower on one device"
        )
    packed_parameters = dict(packed.named_parameters())
    if reference_parameters.keys() != packed_parameters.keys():
        missing = sorted(packed_parameters.keys() - reference_parameters.keys())
        unexpected = sorted(reference_parameters.keys() - packed_parameters.keys())
        raise ValueError(
            f"its parameters are not the packed tower's: missing {missing[:5]}, not in the packed tower "
            f"{unexpected[:5]} (a modified tower, e.g. adapter layers, cannot be swapped)"
        )
    for name, parameter in reference_parameters.items():
        if parameter.shape != packed_parameters[name].shape:
            raise ValueError(f"{name} has shape {tuple(parameter.shape)}, the packed tower's is "
                             f"{tuple(packed_parameters[name].shape)}")
    for name, parameter in reference_parameters.items():
        module_path, _, leaf = name.rpartition(".")
        packed.get_submodule(module_path)._parameters[leaf] = parameter
    left_on_meta = [name for name, tensor in packed.state_dict().items() if tensor.is_meta]
    if left_on_meta:
        raise ValueError(f"the packed tower has tensors the reference does not: {left_on_meta[:5]}")


def _copy_gradient_checkpointing(tower: nn.Module, packed: nn.Module) -> None:
    """Same checkpointing function, on the layers of the same names, as transformers set it on the reference."""
    reference_modules = dict(tower.named_modules())
    checkpointed = [module for module in reference_modules.values() if getattr(module, "gradient_checkpointing", False)]
    if not checkpointed:
        return
    checkpoint_function = checkpointed[0]._gradient_checkpointing_func
    for name, module in packed.named_modules():
        if hasattr(module, "gradient_checkpointing"):
            # transformers >= 5 may checkpoint every n-th layer only; 4.57 sets the flag on the encoder, not layers.
            same_module = reference_modules.get(name)
            module.gradient_checkpointing = getattr(same_module, "gradient_checkpointing", True)
            module._gradient_checkpointing_func = checkpoint_function
