"""GPU: how much host time does one fused add + norm cost the forward thread, and how much of it is Triton's launcher?
The eager encode job is bound by the forward thread's host time (RESULTS.md, session 13), and each forward makes 2
fused norms per layer (54 for so400m, 48 for AIMv2-L). Times, per call, host-bound (small GPU work, back to back):

1. `fused_norm.fused_add_norm` as the towers call it (the device guard, `contiguous`, two `empty_like`, the launch);
2. its launch alone through `kernel[grid](...)` (Triton's binder, specialization and cache lookup, then the launch);
3. the same compiled kernel through `CompiledKernel[grid](...)` (the launch alone, no binder or lookup);
4. torch's add + `layer_norm` (two native kernels), for scale;

and checks that 3 writes the bits of 1. Run in session 14 (RESULTS.md): 27.8 / 16.7 / 9.4 / 18.9 us at 256 x 1152.

    python3 benchmarks/probes/triton_launch_cost.py [TOKENS] [WIDTH] [CALLS]
"""

import sys
import time

import torch

from packed_vit.modeling import fused_norm


def per_call_us(launch, calls: int) -> float:
    for _ in range(20):
        launch()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        launch()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / calls * 1e6


if __name__ == "__main__":
    tokens, width, calls = (int(a) for a in (sys.argv[1:] + ["256", "1152", "5000"])[:3])
    x, delta = (torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight, bias = (torch.randn(width, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    summed, out = torch.empty_like(x), torch.empty_like(x)
    block = fused_norm.triton.next_power_of_2(width)
    args = (x, delta, summed, out, weight, bias, width, 1e-6)
    constexprs = dict(HAS_DELTA=True, RMS=False, HAS_BIAS=True, BLOCK=block)
    compiled = fused_norm._add_norm_kernel[(tokens,)](*args, **constexprs)  # returns the CompiledKernel it ran
    grid_runner = compiled[(tokens, 1, 1)]
    stream = torch.cuda.current_stream().cuda_stream

    def runner(*arguments, stream):  # Triton 3.6's launcher takes the constexprs' values too, after the arguments
        return grid_runner(*arguments, *constexprs.values(), stream=stream)

    expected = fused_norm.fused_add_norm(x, delta, weight, bias, 1e-6, False)
    summed.zero_(), out.zero_()
    runner(*args, stream=stream)
    torch.cuda.synchronize()
    same = torch.equal(summed, expected[0]) and torch.equal(out, expected[1])

    times = {
        "fused_add_norm (as the towers call it)": lambda: fused_norm.fused_add_norm(x, delta, weight, bias, 1e-6,
                                                                                   False),
        "kernel[grid](...) alone": lambda: fused_norm._add_norm_kernel[(tokens,)](*args, **constexprs),
        "CompiledKernel[grid](...)": lambda: runner(*args, stream=stream),
        "torch add + layer_norm": lambda: torch.nn.functional.layer_norm(x + delta, (width,), weight, bias, 1e-6),
    }
    print(f"{tokens} x {width} bf16, {calls} calls each; CompiledKernel gives the same bits: {same}")
    for name, launch in times.items():
        print(f"  {per_call_us(launch, calls):7.1f} us host per call  {name}", flush=True)
