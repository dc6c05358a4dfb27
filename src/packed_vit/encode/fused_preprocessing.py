"""A whole chunk's resize, crop, rescale, normalize and patch cutting in two Triton launches (the GPU path, CUDA).

Written by hand because torch runs the GPU path's antialiased resize as one kernel per image, with three more host
calls per image around it (uint8 -> float32, the crop, the patches' copy): about 70 us of host time per image in
the thread that shares the GIL with the forwards' launches, and each image's kernel sums every output pixel's whole
window in one pass, width x height taps (the preprocessing's GPU time and the host time: benchmarks/RESULTS.md).
Here the images of a chunk go through two launches, whatever their sizes:

1. `_rows_kernel`: each input row of each image, resampled to the output's columns (the horizontal window sums);
2. `_columns_kernel`: those rows resampled to the output's rows (the vertical window sums), then rounded to 0..255,
   normalized and written straight into the chunk's patches, [patches, p * p * 3] channel last.

Same bits as torch's kernel (`upsample_gen2d_aa_out_frame`, which `tvF.resize(antialias=True)` runs on CUDA): it too
sums each row's window first (in float32, in index order, the first tap a product and the rest fused multiply-adds)
and then the column of those sums, with the same weights (`_compute_weights_span` / `_compute_weights`: the filter of
PIL's, normalized by its sum). Only the order of the work differs: each row's sums are made once here instead of
once per output row. Tested against `TorchPreprocessing` to the bit (tests/test_encode_gpu.py).
"""

from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the GPU path is CUDA only, and falls back to the torch ops without Triton
    triton = None

# The fields of an image's row of the int64 table the kernels read: where its pixels are and how they are laid out,
# its sizes (input, resized, the crop's window), where its row sums and its patches go. Constants of the kernels too.
_constant = tl.constexpr if triton is not None else int
SOURCE, STRIDE_C, STRIDE_Y, STRIDE_X, IN_H, IN_W, RESIZED_H, RESIZED_W, TOP, LEFT, OUT_H, OUT_W, ROWS_AT, PATCH_AT, \
    FIELDS = map(_constant, range(15))  # fmt: skip
ROWS_BLOCK_Y, ROWS_BLOCK_X = 8, 64  # `_rows_kernel`'s tile: input rows x output columns
COLUMNS_BLOCK_Y, COLUMNS_BLOCK_X = 8, 64  # `_columns_kernel`'s tile: output rows x output columns
MAX_ROW_SUMS_BYTES = 256 << 20  # the horizontal sums of a group of images, float32: a chunk goes in groups of this
_hashing_triton = threading.Lock()  # `hash_triton_compiler`'s: one thread hashes, the others wait for its key


def hash_triton_compiler() -> None:
    """The one per-process cost of Triton's first kernel launch that needs neither a GPU nor a kernel, paid once:
    the key of its on-disk compile cache hashes Triton's own compiler library (~400 MB read and hashed once per
    process, `triton.runtime.cache.triton_key` in Triton 3.6-3.9). In cProfile it was 0.43 s of the zero-weight
    warm-up's 1.3 s on the GPU machine (RESULTS.md, encode job, session 15). The job starts it in a thread of its own
    (`start_hashing_triton_compiler`), and each thread of the job's start-up that launches Triton kernels calls it
    first. The lock is why: `triton_key`'s cache (`functools.lru_cache`) keeps a result, not a computation in
    progress, so the threads that launched their first kernel before the first hash had ended hashed again, each
    ~0.5 s beside the others (sampled: RESULTS.md, encode job, session 17); with it they wait for the one hash. A
    private function of Triton: where it is not there, nothing is done and the first launch pays it."""
    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        return
    with _hashing_triton, contextlib.suppress(Exception):  # a head start: the first launch hashes if this failed
        triton_key()


@functools.cache  # once per process
def start_hashing_triton_compiler() -> None:
    """`hash_triton_compiler` in a daemon thread from now on, once per process (a later call does nothing): the
    job starts it as soon as it knows its device is CUDA, before the listing and the workers' fork, so that the
    threads that launch Triton kernels later find the key made or in progress. The reads and the hashing release
    the GIL, so it runs beside the main thread. Triton itself is imported here, in the caller's thread: a fork while
    another thread is in the middle of an import leaves that module's import lock held in the child. (The hash then
    imports a few of Triton's subpackages, which the workers never import.)"""
    try:
        from triton.runtime.cache import triton_key  # noqa: F401
    except ImportError:
        return
    threading.Thread(target=hash_triton_compiler, name="packed-vit hash_triton_compiler", daemon=True).start()


if triton is not None:

    @triton.jit
    def _filter(x, BICUBIC: tl.constexpr):
        """PIL's (and torch's antialiased) bilinear or bicubic (a = -0.5) filter."""
        x = tl.abs(x)
        if BICUBIC:
            near = ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1.0
            far = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
            return tl.where(x < 1.0, near, tl.where(x < 2.0, far, 0.0))
        return tl.where(x < 1.0, 1.0 - x, 0.0)

    @triton.jit
    def _window(index, in_size, out_size, BICUBIC: tl.constexpr):
        """The input window of output pixels `index` along one axis, as torch computes it: (first input index,
        its length, the loop's bound, xmin - center, 1 / scale if downscaling)."""
        scale = tl.math.div_rn(in_size.to(tl.float32), out_size.to(tl.float32))  # area_pixel_compute_scale
        half_size = 2.0 if BICUBIC else 1.0  # interp_filter.size * 0.5
        support = tl.where(scale >= 1.0, half_size * scale, half_size)
        center = scale * (index.to(tl.float32) + 0.5)
        first = tl.maximum((center - support + 0.5).to(tl.int32), 0)
        length = tl.minimum((center + support + 0.5).to(tl.int32), in_size.to(tl.int32)) - first
        bound = tl.math.ceil(support).to(tl.int32) * 2 + 1  # interp_size: no window is longer
        invscale = tl.where(scale >= 1.0, tl.math.div_rn(tl.full([], 1.0, tl.float32), scale), 1.0)
        return first, length, bound, first.to(tl.float32) - center, invscale

    @triton.jit
    def _weight_sum(length, bound, first_minus_center, invscale, BICUBIC: tl.constexpr):
        total = tl.zeros(first_minus_center.shape, tl.float32)
        for j in range(0, bound):
            w = _filter((j + first_minus_center + 0.5) * invscale, BICUBIC)
            total += tl.where(j < length, w, 0.0)
        return total

    @triton.jit
    def _weight(j, total, first_minus_center, invscale, BICUBIC: tl.constexpr):
        w = _filter((j + first_minus_center + 0.5) * invscale, BICUBIC)
        return tl.where(total != 0.0, tl.math.div_rn(w, total), w)

    @triton.jit
    def _tile(images_ptr, tiles_ptr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
        """This program's image (its row of the table) and its tile: rows y (input rows for `_rows_kernel`, output
        rows for `_columns_kernel`) and output columns x, BLOCK_X of them per tile across the crop's width."""
        image = tl.load(tiles_ptr + 2 * tl.program_id(0))
        tile = tl.load(tiles_ptr + 2 * tl.program_id(0) + 1)
        meta = images_ptr + image * FIELDS
        tiles_x = tl.cdiv(tl.load(meta + OUT_W), BLOCK_X)
        y = (tile // tiles_x) * BLOCK_Y + tl.arange(0, BLOCK_Y)
        x = (tile % tiles_x) * BLOCK_X + tl.arange(0, BLOCK_X)
        return meta, y, x

    @triton.jit
    def _rows_kernel(images_ptr, tiles_ptr, sums_ptr, BICUBIC: tl.constexpr, BLOCK_Y: tl.constexpr,
                     BLOCK_X: tl.constexpr):  # fmt: skip
        """sums[image][c][y][x] = the horizontal window sum of input row y at output column x (after the crop)."""
        meta, y, x = _tile(images_ptr, tiles_ptr, BLOCK_Y, BLOCK_X)
        source = tl.load(meta + SOURCE).to(tl.pointer_type(tl.uint8))
        stride_c, stride_y, stride_x = tl.load(meta + STRIDE_C), tl.load(meta + STRIDE_Y), tl.load(meta + STRIDE_X)
        in_h, in_w, resized_w = tl.load(meta + IN_H), tl.load(meta + IN_W), tl.load(meta + RESIZED_W)
        left, out_w, rows_at = tl.load(meta + LEFT), tl.load(meta + OUT_W), tl.load(meta + ROWS_AT)
        first, length, bound, first_minus_center, invscale = _window(x + left, in_w, resized_w, BICUBIC)
        total = _weight_sum(length, bound, first_minus_center, invscale, BICUBIC)
        inside = (y < in_h)[:, None] & (x < out_w)[None, :]
        pixel = source + y.to(tl.int64)[:, None] * stride_y
        sum_r = tl.zeros([BLOCK_Y, BLOCK_X], tl.float32)
        sum_g = tl.zeros([BLOCK_Y, BLOCK_X], tl.float32)
        sum_b = tl.zeros([BLOCK_Y, BLOCK_X], tl.float32)
        for j in range(0, bound):
            w = _weight(j, total, first_minus_center, invscale, BICUBIC)[None, :]
            take = inside & (j < length)[None, :]
            at = pixel + (first + j).to(tl.int64)[None, :] * stride_x
            # the first tap is fma(p, w, 0) = p * w, the product torch starts with; then fused multiply-adds
            sum_r = tl.where(take, tl.fma(tl.load(at, mask=take, other=0).to(tl.float32), w, sum_r), sum_r)
            sum_g = tl.where(take, tl.fma(tl.load(at + stride_c, mask=take, other=0).to(tl.float32), w, sum_g), sum_g)
            sum_b = tl.where(take, tl.fma(tl.load(at + 2 * stride_c, mask=take, other=0).to(tl.float32), w, sum_b),
                             sum_b)  # fmt: skip
        plane = in_h * out_w
        out = sums_ptr + rows_at + y.to(tl.int64)[:, None] * out_w + x[None, :]
        tl.store(out, sum_r, mask=inside)
        tl.store(out + plane, sum_g, mask=inside)
        tl.store(out + 2 * plane, sum_b, mask=inside)

    @triton.jit
    def _columns_kernel(images_ptr, tiles_ptr, sums_ptr, patches_ptr, mean_ptr, std_ptr, BICUBIC: tl.constexpr,
                        PATCH: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):  # fmt: skip
        """patches[...] = normalize(round(the vertical window sum of the row sums)), channel last in each patch."""
        meta, y, x = _tile(images_ptr, tiles_ptr, BLOCK_Y, BLOCK_X)
        in_h, resized_h, top = tl.load(meta + IN_H), tl.load(meta + RESIZED_H), tl.load(meta + TOP)
        out_h, out_w = tl.load(meta + OUT_H), tl.load(meta + OUT_W)
        rows_at, patch_at = tl.load(meta + ROWS_AT), tl.load(meta + PATCH_AT)
        first, length, bound, first_minus_center, invscale = _window(y + top, in_h, resized_h, BICUBIC)
        total = _weight_sum(length, bound, first_minus_center, invscale, BICUBIC)
        inside = (y < out_h)[:, None] & (x < out_w)[None, :]
        plane = in_h * out_w
        row_sum = sums_ptr + rows_at + x[None, :]
        value_r = tl.zeros([BLOCK_Y, BLOCK_X], tl.float32)
        value_g = tl.zeros([BLOCK_Y, BLOCK_X], tl.float32)
        value_b = tl.zeros([BLOCK_Y, BLOCK_X], tl.float32)
        for j in range(0, bound):
            w = _weight(j, total, first_minus_center, invscale, BICUBIC)[:, None]
            take = inside & (j < length)[:, None]
            at = row_sum + (first + j).to(tl.int64)[:, None] * out_w
            value_r = tl.where(take, tl.fma(tl.load(at, mask=take, other=0.0), w, value_r), value_r)
            value_g = tl.where(take, tl.fma(tl.load(at + plane, mask=take, other=0.0), w, value_g), value_g)
            value_b = tl.where(take, tl.fma(tl.load(at + 2 * plane, mask=take, other=0.0), w, value_b), value_b)
        # torchvision's uint8 result (clamped for bicubic, rounded half to even), then its fused rescale + normalize
        patch = patch_at + (y // PATCH)[:, None] * (out_w // PATCH) + (x // PATCH)[None, :]
        within = (y % PATCH)[:, None] * PATCH + (x % PATCH)[None, :]
        out = patches_ptr + patch.to(tl.int64) * (PATCH * PATCH * 3) + within * 3
        _store_normalized(out, value_r, 0, mean_ptr, std_ptr, inside, BICUBIC)
        _store_normalized(out, value_g, 1, mean_ptr, std_ptr, inside, BICUBIC)
        _store_normalized(out, value_b, 2, mean_ptr, std_ptr, inside, BICUBIC)

    @triton.jit
    def _store_normalized(out, value, channel: tl.constexpr, mean_ptr, std_ptr, inside, BICUBIC: tl.constexpr):
        if BICUBIC:
            value = tl.minimum(tl.maximum(value, 0.0), 255.0)
        # rounded half to even (torch's round): adding 2^23 leaves no fraction bits, and IEEE rounds the sum so
        value = (value + 8388608.0) - 8388608.0
        mean, std = tl.load(mean_ptr + channel), tl.load(std_ptr + channel)
        tl.store(out + channel, tl.math.div_rn(value - mean, std), mask=inside)


def table_sections(sections: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """int64 arrays -> views of one tensor on `device` holding them all: one host-to-device copy for all of them,
    from pinned memory, so that the host does not wait for the stream's earlier work (the CPU: Triton's interpreter,
    in the tests). Each view starts at a multiple of 16 bytes: Triton compiles a kernel again for a pointer argument
    that is not (it specializes on that alignment), so an odd number of images in a group would cost a compile."""
    starts = np.cumsum([0] + [-(-len(section) // 2) * 2 for section in sections])  # in int64s, each even
    table = np.zeros(int(starts[-1]), dtype=np.int64)
    for start, section in zip(starts, sections):
        table[start : start + len(section)] = section
    table = torch.from_numpy(table)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    return [table[start : start + len(section)] for start, section in zip(starts, sections)]


def _tiles(counts: np.ndarray) -> np.ndarray:
    """[2 * sum(counts)] int64: (image, its tile) for every tile of every image, one program each."""
    images = np.repeat(np.arange(len(counts)), counts)
    firsts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.stack([images, np.arange(len(images)) - firsts], axis=1).reshape(-1)


class FusedChunkPreprocessing:
    """`TorchPreprocessing`'s resize (bilinear or bicubic, antialiased), center crop and normalize of many images at
    once, into one float32 tensor of their patches. Made by `for_options`, which says None where it does not apply
    (no Triton, other filters, no resize or normalize): the torch ops run then."""

    def __init__(self, bicubic: bool, patch_size: int, mean: torch.Tensor, std: torch.Tensor):
        self.bicubic, self.patch_size = bicubic, patch_size
        self.mean, self.std = mean.float().contiguous(), std.float().contiguous()  # already / the rescale factor
        self.warming: threading.Thread | None = None  # `start_warm_up`'s, until `patches` has waited for it

    @classmethod
    def for_options(cls, mode: str | None, options: dict, mean, std, device: torch.device):
        if triton is None or device.type != "cuda" or mode not in ("bilinear", "bicubic"):
            return None
        if not options["do_resize"] or mean is None:
            return None
        return cls(mode == "bicubic", options["patch_size"], mean.to(device), std.to(device))

    def start_warm_up(self, device: torch.device) -> None:
        """Both kernels' first launch, on a tiny image, in a thread of its own from now on: it compiles them (Triton,
        the first run on a machine: about a second each), or reads them from Triton's cache, and loads them. Started
        when the GPU preprocessing is made, it runs beside the decoder's making and the model's load, not in the first
        chunk that the first forwards wait for. `patches` waits for it. An error here is left for `patches` to
        raise, where the pipeline reports it."""

        def warm_up():
            hash_triton_compiler()  # or wait for the job's hash in progress
            with contextlib.suppress(Exception), torch.cuda.stream(torch.cuda.Stream(device)):
                side = 2 * self.patch_size  # resized to one patch: both kernels' every step runs
                self.make_patches([torch.zeros(3, side, side, dtype=torch.uint8, device=device)],
                                  [(self.patch_size, self.patch_size)], [(0, 0, self.patch_size, self.patch_size)])
                torch.cuda.current_stream(device).synchronize()

        self.warming = threading.Thread(target=warm_up, name="packed-vit preprocessing kernels", daemon=True)
        self.warming.start()

    def patches(self, images: list[torch.Tensor], resized: list[tuple[int, int]],
                crops: list[tuple[int, int, int, int]]) -> torch.Tensor:  # fmt: skip
        """[3, H, W] uint8 CUDA images (any strides), each resized to `resized` (height, width), then cut to its
        `crops` window (top, left, height, width; sides multiples of the patch, inside the resized image) ->
        float32 patches [sum of h * w, p * p * 3], image after image, as `TorchPreprocessing` makes them."""
        self.wait_for_warm_up()
        return self.make_patches(images, resized, crops)

    def ready(self) -> bool:
        """Its warm-up has ended: the kernels are compiled (or read from Triton's cache) and loaded. Until then
        `GpuPreprocessing` makes a chunk's patches with the torch ops, to the same bits, instead of waiting: on a
        machine's first run Triton compiles both kernels (~0.5 s each), and the first chunks, which the first forward
        waits for, then waited for that compile (sampled: RESULTS.md, encode job, session 18)."""
        return self.warming is None or not self.warming.is_alive()

    def wait_for_warm_up(self) -> None:
        if self.warming is not None:
            self.warming.join()
            self.warming = None

    def make_patches(self, images, resized, crops) -> torch.Tensor:  # `patches`, without waiting for the warm-up
        device, patch = images[0].device, self.patch_size
        meta = np.zeros((len(images), FIELDS), dtype=np.int64)  # one numpy call per field, not per image
        meta[:, SOURCE] = [image.data_ptr() for image in images]
        meta[:, STRIDE_C : STRIDE_X + 1] = [image.stride() for image in images]
        meta[:, IN_H : IN_W + 1] = [image.shape[1:] for image in images]
        meta[:, RESIZED_H : RESIZED_W + 1] = resized
        meta[:, TOP : OUT_W + 1] = crops
        out_h, out_w = meta[:, OUT_H], meta[:, OUT_W]
        patch_counts = (out_h // patch) * (out_w // patch)
        meta[:, PATCH_AT] = np.cumsum(patch_counts) - patch_counts
        patches = torch.empty(int(patch_counts.sum()), patch * patch * 3, device=device)
        sums_sizes = 3 * meta[:, IN_H] * out_w
        start = 0
        while start < len(images):  # groups of images whose row sums fit MAX_ROW_SUMS_BYTES (at least one image)
            fits = np.cumsum(sums_sizes[start:]) * 4 <= MAX_ROW_SUMS_BYTES
            stop = start + max(1, int(fits.sum()))
            self._launch(meta[start:stop], sums_sizes[start:stop], patches, device)
            start = stop
        return patches

    def _launch(self, meta: np.ndarray, sums_sizes: np.ndarray, patches: torch.Tensor, device: torch.device) -> None:
        meta = meta.copy()  # its rows' ROWS_AT: within this group's row sums
        meta[:, ROWS_AT] = np.cumsum(sums_sizes) - sums_sizes
        row_tiles = _tiles(-(-meta[:, IN_H] // ROWS_BLOCK_Y) * -(-meta[:, OUT_W] // ROWS_BLOCK_X))
        column_tiles = _tiles(-(-meta[:, OUT_H] // COLUMNS_BLOCK_Y) * -(-meta[:, OUT_W] // COLUMNS_BLOCK_X))
        images, rows, columns = table_sections([meta.reshape(-1), row_tiles, column_tiles], device)
        sums = torch.empty(int(sums_sizes.sum()), device=device)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            # Triton launches on the thread's current device (and its current stream), not the tensors' device
            _rows_kernel[(len(row_tiles) // 2,)](
                images, rows, sums, BICUBIC=self.bicubic, BLOCK_Y=ROWS_BLOCK_Y, BLOCK_X=ROWS_BLOCK_X
            )
            _columns_kernel[(len(column_tiles) // 2,)](
                images, columns, sums, patches, self.mean, self.std, BICUBIC=self.bicubic, PATCH=self.patch_size,
                BLOCK_Y=COLUMNS_BLOCK_Y, BLOCK_X=COLUMNS_BLOCK_X,
            )  # fmt: skip
