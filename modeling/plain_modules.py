"""When a fast path may read a module's weights instead of calling it.

The towers' fast paths apply a submodule's parameters themselves: fc1 with its tanh-GELU in the GEMM's epilogue,
AIMv2's Conv2d patch embedding as a linear map on the patches, the fused residual add + norm, the pooling head's
`nn.MultiheadAttention` on packed tokens. That is only the module's own computation when the module is exactly what
the fast path expects. An adapter (PEFT's LoRA / DoRA layers wrap the module or subclass-swap it), a
parametrization (`torch.nn.utils.parametrize` swaps the module's class) or a forward hook changes what calling the
module computes, and a fast path that read `module.weight` would silently drop it: there the module is called.

One predicate for every call site; it costs a type check and two dict lookups (well under a microsecond), so it can
run on every forward. Global module hooks (`register_module_forward_hook`) do not count: profilers and FLOP counters
install them to watch every module, and they should measure the forward that runs without them.
"""

from __future__ import annotations

from torch import nn


def is_plain(module: nn.Module, expected: type[nn.Module]) -> bool:
    """Whether `module` is exactly an `expected` (not a subclass, a wrapper or a parametrized copy) with no forward
    hook of its own: then reading its parameters computes what calling it does."""
    return type(module) is expected and not module._forward_hooks and not module._forward_pre_hooks
