"""What both packed towers are made of around their layers: the encoder stack, the `PreTrainedModel` base with
the packed forward and attention-backend selection, and the seed-compatible wrapper."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

from .attention import check_attn_implementation, resolve_attn_implementation
from .checkpoint_loading import load_pretrained
from .cuda_graphs import CudaGraphRunner
from .packing import PackedGrid, check_packed_batch, pack_inputs
from .reference_calls import PaddedBatch

# CPU inference of many frames runs in passes of at most this many tokens per thread torch computes with: on one
# thread, one pass over thousands of tokens streams every activation through memory between ops and measured 5-15%
# slower than the reference's per-image loop, while passes of about one large image's tokens keep them in cache; on 8
# threads, passes that small measured slower than one pass of 3.3k tokens (the GEMMs split their rows between the
# threads, and the caches grow with them). benchmarks/RESULTS.md, small batches.
CPU_TOKENS_PER_PASS_PER_THREAD = 512


def cpu_tokens_per_pass() -> int:
    return CPU_TOKENS_PER_PASS_PER_THREAD * torch.get_num_threads()


class PackedEncoder(nn.Module):
    """The stack of encoder layers, all run on the same per-forward `packed` metadata (key prefix `layers.N`)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden_states, packed: PackedGrid, backend: str, output_hidden_states: bool = False):
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, packed=packed, backend=backend)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states)


class PackedVisionPreTrainedModel(PreTrainedModel):
    """Base of both towers: the packed forward, and attention-backend selection.

    A tower defines `embeddings(patches, packed)`, `encoder` (a `PackedEncoder`), `final_norm` and, when the
    checkpoint has one, `head(last_hidden_state, packed, backend)`.
    """

    main_input_name = "hidden_states"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs):
        # Our backends are our own (varlen kernels on packed tokens), not transformers' per-model attention
        # interfaces, so we validate the names ourselves, on every transformers version.
        return check_attn_implementation(attn_implementation)

    def attention_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        requested = getattr(self.config, "_attn_implementation", None)
        if torch.is_autocast_enabled(device.type):  # fp32 master weights under autocast: attention runs in its dtype
            dtype = torch.get_autocast_dtype(device.type)
        return resolve_attn_implementation(check_attn_implementation(requested), device, dtype)

    def forward(
        self,
        hidden_states: torch.Tensor | None = None,  # [N, p*p*C] patches, (row, col, channel) each
        grid_thw: torch.Tensor | None = None,  # [B, 3] (t, h, w) in patches
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        pixel_values: torch.Tensor | None = None,  # the image processors' name for `hidden_states`
        pixel_attention_mask: torch.Tensor | None = None,  # [B, P]: the reference's padded call (reference_calls.py)
        spatial_shapes: torch.Tensor | None = None,  # [B, 2]: the same
        attention_mask: torch.Tensor | None = None,  # pixel_attention_mask as 4.57's Siglip2VisionTransformer names it
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """-> last_hidden_state [N, D]; pooler_output [num_frames, D] (None without head); hidden_states.

        Also takes the reference tower's own call (Siglip2: padded `pixel_values [B, P, p*p*C]`,
        `pixel_attention_mask [B, P]`, `spatial_shapes [B, 2]`; AIMv2: images `[B, C, H, W]`) and then returns the
        reference's shapes, last_hidden_state [B, P, D] with zero padding rows: see reference_calls.py.
        """
        patches = hidden_states if hidden_states is not None else pixel_values
        config = self.config
        if output_attentions:
            raise ValueError("output_attentions=True: the packed tower's varlen attention kernels return no weights")
        # ---- The reference tower's own call: packed here, the outputs put back into its shapes at the end. ----
        mask = pixel_attention_mask if pixel_attention_mask is not None else attention_mask
        reference_call = self.reference_call(patches, grid_thw, mask, spatial_shapes)
        if reference_call is not None:
            patches, grid_thw = reference_call.patches, reference_call.grid_thw
        grid_thw = check_packed_batch(patches, grid_thw, config.num_channels * config.patch_size**2)
        backend = self.attention_backend(patches.device, self.get_input_embeddings().weight.dtype)
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states

        graphs = self.cuda_graphs  # small inference batches on CUDA: a captured graph replays the whole forward
        replayed = None if graphs is None else graphs.forward(self, patches, grid_thw, backend, output_hidden_states)
        if replayed is not None:
            (last_hidden_state, pooler_output), all_hidden_states = replayed, None
        elif self.runs_in_passes(patches, grid_thw):
            last_hidden_state, pooler_output, all_hidden_states = self.forward_in_passes(
                patches, grid_thw, backend, output_hidden_states
            )
        else:
            packed = PackedGrid.from_grid_thw(grid_thw, patches.device)
            embeddings = self.embeddings(patches, packed)  # [N, D]
            last_hidden_state, pooler_output, all_hidden_states = self.encode(
                embeddings, packed, backend, output_hidden_states
            )

        output = BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state, pooler_output=pooler_output, hidden_states=all_hidden_states
        )
        if reference_call is not None:  # ---- back into the reference's shapes ----
            output = reference_call.unpack_output(output)
        return output if return_dict is not False else output.to_tuple()

    @staticmethod
    def runs_in_passes(patches: torch.Tensor, grid_thw: torch.Tensor) -> bool:
        """CPU inference of more than `cpu_tokens_per_pass()` tokens, several frames, one process. Never with autograd
        or in a process group: ranks would make different numbers of passes, and FSDP gathers each layer's weights
        on every pass, so their collectives would stop matching."""
        return (
            patches.device.type == "cpu" and not torch.is_grad_enabled() and len(grid_thw) > 1
            and patches.shape[0] > cpu_tokens_per_pass()
            and not (torch.distributed.is_available() and torch.distributed.is_initialized())
        )  # fmt: skip

    def forward_in_passes(self, patches, grid_thw, backend: str, output_hidden_states: bool):
        """The CPU forward of many frames: consecutive frames, whole, in passes of at most `cpu_tokens_per_pass()`
        tokens (a larger frame alone); frames never see each other, so this is the one-pass forward in pieces."""
        patch_dim = self.config.num_channels * self.config.patch_size**2
        passes, start, row, limit = [], 0, 0, cpu_tokens_per_pass()
        lengths = grid_thw.prod(-1).tolist()
        while row < len(lengths):
            end, tokens = row + 1, lengths[row]
            while end < len(lengths) and tokens + lengths[end] <= limit:
                tokens += lengths[end]
                end += 1
            piece = pack_inputs(patches[start : start + tokens], grid_thw[row:end], patch_dim)
            passes.append(self.encode(self.embeddings(patches[start : start + tokens], piece), piece, backend,
                                      output_hidden_states))  # fmt: skip
            start, row = start + tokens, end
        last_hidden_state = torch.cat([p[0] for p in passes])
        pooler_output = torch.cat([p[1] for p in passes]) if passes[0][1] is not None else None
        hidden_states = tuple(map(torch.cat, zip(*(p[2] for p in passes)))) if output_hidden_states else None
        return last_hidden_state, pooler_output, hidden_states

    def encode(self, embeddings: torch.Tensor, packed: PackedGrid, backend: str, output_hidden_states: bool = False):
        """Everything after the embeddings: embeddings [N, D] -> (last_hidden_state [N, D], pooler_output [F, D] or
        None, hidden_states per layer or None). Only device-side metadata is read here (`cu_seqlens`, `max_seqlen`),
        which is what lets cuda_graphs.py capture it."""
        encoded = self.encoder(embeddings, packed, backend, output_hidden_states)
        last_hidden_state = self.final_norm(encoded.last_hidden_state)
        head = getattr(self, "head", None)
        pooler_output = head(last_hidden_state, packed, backend) if head is not None else None  # [F, D]
        return last_hidden_state, pooler_output, encoded.hidden_states

    # CUDA-graph replay of small inference batches (cuda_graphs.py): off until enabled.
    cuda_graphs: CudaGraphRunner | None = None

    def enable_cuda_graphs(self, max_tokens: int = 16384, max_frames: int = 256, max_graphs: int = 32):
        """Inference on CUDA replays captured CUDA graphs for batches of up to `max_tokens` patches and `max_frames`
        frames: one graph per size bucket, captured on the bucket's first batch; same calls, same outputs.

        Memory: one pool of activations shared by all graphs (about the activations of one `max_tokens` forward) plus
        static input and output buffers of `max_tokens` rows and the position rows of recent frame shapes (at most
        `max_tokens` rows); benchmarks/RESULTS.md gives so400m's. Graphs are
        dropped when the model is moved or cast, or its modules or parameters are replaced. Forward hooks run at
        capture only. Returns the model.
        """
        self.cuda_graphs = CudaGraphRunner(max_tokens=max_tokens, max_frames=max_frames, max_graphs=max_graphs)
        return self

    def disable_cuda_graphs(self):
        """Back to eager forwards; the graphs and their memory are released. Returns the model."""
        self.cuda_graphs = None
        return self

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() may move every parameter: graphs captured on the old memory are dropped.
        if self.cuda_graphs is not None:
            self.cuda_graphs.reset()
        return super()._apply(fn, *args, **kwargs)

    def reference_call(self, patches, grid_thw, pixel_attention_mask, spatial_shapes) -> PaddedBatch | None:
        """The packed batch of a call in the reference tower's own form (reference_calls.py), or None."""
        if grid_thw is not None and pixel_attention_mask is None and spatial_shapes is None:
            return None  # packed (hidden_states, grid_thw); a wrong shape is pack_inputs' error to report
        reference_call = self.pack_reference_call(patches, pixel_attention_mask, spatial_shapes)
        if reference_call is not None and grid_thw is not None:
            raise ValueError("Pass either packed patches with grid_thw or the reference tower's padded call, not both")
        return reference_call

    def pack_reference_call(self, patches, pixel_attention_mask, spatial_shapes) -> PaddedBatch | None:
        """Each tower: the packed batch of its reference's call, or None when `patches` are packed."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Any checkpoint of DESIGN §4 (local folder or Hub id), converted and loaded strictly: checkpoint_loading.py."""
        return load_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs)


class LastHiddenStateModule(nn.Module):
    """Seed-compatible wrapper: `Cls(ckpt=..., device=...)`, `forward(hidden_states, grid_thw) -> last_hidden_state`."""

    model_class: type[PreTrainedModel]

    def __init__(self, ckpt: str, device="cpu", dtype: torch.dtype | None = None, **from_pretrained_kwargs):
        super().__init__()
        if dtype is not None:
            from_pretrained_kwargs["dtype"] = dtype
        self.model = self.model_class.from_pretrained(ckpt, **from_pretrained_kwargs).to(device).eval()

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.model(hidden_states, grid_thw).last_hidden_state
