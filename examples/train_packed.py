"""Train a packed vision tower on several processes with DDP or FSDP2; `--check` proves the result exact.

    torchrun --nproc_per_node 2 examples/train_packed.py --strategy fsdp2 --steps 20 --bf16
    torchrun --nproc_per_node 2 examples/train_packed.py --strategy ddp --device cpu --check

Every rank packs its own images (random grids, so different token counts per rank) into one
`[total_patches, patch_dim]` batch with its `grid_thw`: no padding anywhere. The engines are torch's own:
`DistributedDataParallel`, or FSDP2 (`fully_shard` on each encoder layer, then on the root).

The objective is a toy one (match random per-token and per-frame targets), normalised so that the ranks' losses
add up to the loss of the global batch; `--check` runs one step and compares the loss and every gradient with one
process running the concatenated batch (on rank 0), and exits non-zero when they differ by more than the tolerance.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from packed_vit import (
    Aimv2PackingVisionConfig,
    Aimv2PackingVisionModel,
    Siglip2PackingVisionConfig,
    Siglip2PackingVisionModel,
)

TOWERS = {
    "siglip2": (Siglip2PackingVisionConfig, Siglip2PackingVisionModel),
    "aimv2": (Aimv2PackingVisionConfig, Aimv2PackingVisionModel),
}
# A small random tower by default (any GPU and the CPU run it in seconds); `--model PATH` loads a real one.
SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, patch_size=4)

# --check tolerances, per module gradient and for the loss. fp32: DESIGN §7's 1e-5. bf16: a distributed step may
# round differently from one process (other matmul shapes, partial sums reduced across ranks), so it must be as
# close to the fp32 result as the one-process bf16 step is: ratio of the two errors <= BF16_RATIO (DESIGN §7).
FP32_REL_TOL = 1e-5
BF16_RATIO = 1.1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tower", choices=TOWERS, default="siglip2")
    parser.add_argument("--model", help="checkpoint path or Hub id (default: a small random tower)")
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dist-backend", help="default: nccl on cuda, gloo on cpu (gloo also runs 2 ranks on 1 GPU)")
    parser.add_argument("--attn", default=None, help="attn_implementation (default: the fastest available)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, fp32 master weights")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the wrapped model")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--images-per-rank", type=int, default=8)
    parser.add_argument("--max-side", type=int, default=24, help="largest h or w of an image, in patches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="one step, compared with one process on all images")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------
# Setup: process group, model, wrapping
# --------------------------------------------------------------------------------------------------------------


def init_distributed(args) -> torch.device:
    # Also runs as a plain `python examples/train_packed.py`: a world of one.
    for name, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, default)
    os.environ.setdefault("MASTER_PORT", "29533")
    if args.device == "cuda":
        # Ranks beyond the GPU count share GPUs (2 ranks on 1 GPU need --dist-backend gloo: nccl refuses that).
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(args.dist_backend or ("nccl" if device.type == "cuda" else "gloo"))
    return device


def build_model(args, device: torch.device):
    config_class, model_class = TOWERS[args.tower]
    extra = {} if args.attn is None else {"attn_implementation": args.attn}
    if args.model:
        model = model_class.from_pretrained(args.model, **extra)
    else:
        # Same seed on every rank, so every rank builds the same weights: FSDP2 shards what each rank holds
        # (it does not broadcast), DDP broadcasts rank 0's anyway.
        torch.manual_seed(args.seed)
        model = model_class(config_class(**SMALL, **extra))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # per encoder layer (transformers' GradientCheckpointingLayer)
    return model.to(device).train()


def wrap(model, args, device: torch.device):
    """DDP, or FSDP2 with one shard group per encoder layer plus the root (embeddings, norms, head)."""
    if args.strategy == "ddp":
        wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in model.encoder.layers:
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    return torch.compile(wrapped) if args.compile else wrapped


# --------------------------------------------------------------------------------------------------------------
# Data and objective
# --------------------------------------------------------------------------------------------------------------


def rank_batch(args, config, step: int, rank: int):
    """Rank `rank`'s packed batch of step `step`: (patches [N, patch_dim], grid_thw [B, 3], token targets [N, D],
    frame targets [F, D]), on the CPU. A pure function of (seed, step, rank), so rank 0 can rebuild any rank's batch
    for --check: the global batch is the concatenation of the ranks' batches.
    """
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1_009 + rank)
    sides = torch.randint(1, args.max_side + 1, (args.images_per_rank, 2), generator=generator)
    frames = torch.where(torch.rand(args.images_per_rank, generator=generator) < 0.25, 2, 1)  # some 2-frame videos
    grid_thw = torch.cat([frames[:, None], sides], dim=1)
    num_tokens, num_frames = int(grid_thw.prod(1).sum()), int(frames.sum())
    patch_dim = config.num_channels * config.patch_size**2
    patches = torch.randn(num_tokens, patch_dim, generator=generator)
    token_targets = torch.randn(num_tokens, config.hidden_size, generator=generator)
    frame_targets = torch.randn(num_frames, config.hidden_size, generator=generator)
    return patches, grid_thw, token_targets, frame_targets


def concatenated(batches):
    """The global batch: the ranks' packed batches one after the other (packing is concatenation)."""
    return tuple(torch.cat(parts) for parts in zip(*batches))


def loss_on(model, batch, counts, scale: float, device, bf16: bool):
    """Mean squared error over ALL tokens and frames of the global batch, of this process's share, times `scale`.

    Each rank sums its own tokens' (frames') errors and divides by the GLOBAL token (frame) count, so the ranks'
    losses add up to the global loss. DDP and FSDP2 average gradients over ranks (divide by the world size), so
    each rank multiplies its loss by the world size (`scale`): the averaged gradient is then exactly the gradient
    of the global loss, as if one process had run the concatenated batch.
    """
    patches, grid_thw, token_targets, frame_targets = (t.to(device) for t in batch)
    num_tokens, num_frames = counts  # of the global batch
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        out = model(patches, grid_thw)
    dim = token_targets.shape[1]
    loss = (out.last_hidden_state.float() - token_targets).pow(2).sum() / (num_tokens * dim)
    if out.pooler_output is not None:
        loss = loss + (out.pooler_output.float() - frame_targets).pow(2).sum() / (num_frames * dim)
    return loss * scale


def global_counts(batch, device) -> tuple[int, int]:
    """(tokens, frames) of the global batch: each rank knows only its own, one all-reduce sums them."""
    _, grid_thw, _, _ = batch
    counts = torch.tensor([int(grid_thw.prod(1).sum()), int(grid_thw[:, 0].sum())], device=device)
    dist.all_reduce(counts)
    return tuple(counts.tolist())


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def train(args, model, wrapped, device):
    rank, world = dist.get_rank(), dist.get_world_size()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        batch = rank_batch(args, model.config, step, rank)
        loss = loss_on(wrapped, batch, global_counts(batch, device), world, device, args.bf16)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        global_loss = loss.detach() / world
        dist.all_reduce(global_loss)  # the ranks' shares add up to the global batch's loss
        if rank == 0:
            print(f"step {step}: loss {global_loss.item():.6f} ({len(batch[1])} images/rank, {world} ranks)")


# --------------------------------------------------------------------------------------------------------------
# --check: one distributed step == one process on the concatenated batch
# --------------------------------------------------------------------------------------------------------------


def full_gradients(model) -> dict[str, torch.Tensor]:
    """Every parameter's full gradient on this rank (FSDP2 holds shards: `full_tensor()` gathers them)."""
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().float().cpu()
    return grads


def relative_error(grads: dict, reference: dict, names) -> float:
    """||ours - ref|| / ||ref|| over the gradients of `names` taken together."""
    ours = torch.cat([grads[n].flatten() for n in names]).double()
    ref = torch.cat([reference[n].flatten() for n in names]).double()
    return ((ours - ref).norm() / ref.norm()).item()


def module_errors(grads: dict, reference: dict) -> dict[str, float]:
    """Relative gradient error per module (a module's parameters together: `weight` with its `bias`).

    Per module rather than per tensor: a key projection's bias has an exactly-zero gradient (a key bias adds the
    same score to all keys of a query, which softmax cancels), so per tensor it would compare rounding noise.
    """
    modules = {}
    for name in reference:
        modules.setdefault(name.rsplit(".", 1)[0], []).append(name)
    return {module: relative_error(grads, reference, names) for module, names in modules.items()}


def one_process_step(model, batch, counts, device, bf16: bool):
    """(loss, gradients) of one process on the whole `batch`: the reference of --check."""
    model.zero_grad(set_to_none=True)
    loss = loss_on(model, batch, counts, 1.0, device, bf16)
    loss.backward()
    return loss.item(), full_gradients(model)


def check(args, model, wrapped, reference_model, device) -> bool:
    """One step on every rank; rank 0 compares it with `reference_model` (one process) on the global batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = rank_batch(args, model.config, 0, rank)
    counts = global_counts(batch, device)
    loss = loss_on(wrapped, batch, counts, world, device, args.bf16)
    loss.backward()
    grads = full_gradients(model)  # collective under FSDP2: every rank takes part
    distributed_loss = loss.detach() / world
    dist.all_reduce(distributed_loss)
    passed = torch.tensor([1], device=device)
    if rank == 0:
        print(f"check: {how_parameters_are_held(model)}")
        passed[0] = int(compare(args, reference_model, distributed_loss.item(), grads, counts, device))
    dist.broadcast(passed, src=0)  # every rank exits with the verdict
    return bool(passed.item())


def how_parameters_are_held(model) -> str:
    """E.g. 'DTensor, 3072 of 6144 elements of embeddings.patch_embedding.weight on this rank' (FSDP2 shards)."""
    name, param = next(model.named_parameters())
    local = param.to_local() if hasattr(param, "to_local") else param
    return f"{type(param).__name__}, {local.numel()} of {param.numel()} elements of {name} on this rank"


def compare(args, reference_model, loss, grads, counts, device) -> bool:
    world = dist.get_world_size()
    batch = concatenated(rank_batch(args, reference_model.config, 0, r) for r in range(world))
    ref_loss, ref_grads = one_process_step(reference_model, batch, counts, device, args.bf16)
    loss_err = abs(loss - ref_loss) / abs(ref_loss)
    errors = module_errors(grads, ref_grads)
    worst = max(errors, key=errors.get)
    what = f"{args.strategy}, {world} ranks, {'bf16 autocast' if args.bf16 else 'fp32'}, {len(batch[1])} images"
    print(f"check ({what}): loss {loss:.8f} vs one process {ref_loss:.8f}, rel err {loss_err:.2e}")
    print(f"check: gradient rel err per module: max {errors[worst]:.2e} ({worst}), over {len(errors)} modules")
    if not args.bf16:
        passed = max(loss_err, errors[worst]) <= FP32_REL_TOL
        print(f"check: {'PASS' if passed else 'FAIL'} (fp32 tolerance {FP32_REL_TOL:.0e})")
        return passed
    # bf16: errors against the fp32 truth, ours vs the one-process bf16 step's own.
    fp32_loss, fp32_grads = one_process_step(reference_model, batch, counts, device, bf16=False)
    ours = relative_error(grads, fp32_grads, fp32_grads)
    one_process = relative_error(ref_grads, fp32_grads, fp32_grads)
    loss_ratio = abs(loss - fp32_loss) / max(abs(ref_loss - fp32_loss), 1e-30)
    print(f"check: vs fp32, whole gradient rel err {ours:.2e} distributed, {one_process:.2e} one process "
          f"(ratio {ours / one_process:.3f}); loss err ratio {loss_ratio:.3f}")
    passed = ours <= BF16_RATIO * one_process
    print(f"check: {'PASS' if passed else 'FAIL'} (bf16: gradient error ratio <= {BF16_RATIO})")
    return passed


def main(argv=None) -> int:
    args = parse_args(argv)
    device = init_distributed(args)
    try:
        model = build_model(args, device)
        if args.check:
            # The reference: an unsharded, unwrapped copy on rank 0, taken before anything touches the weights.
            reference_model = copy.deepcopy(model) if dist.get_rank() == 0 else None
            return 0 if check(args, model, wrap(model, args, device), reference_model, device) else 1
        train(args, model, wrap(model, args, device), device)
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
