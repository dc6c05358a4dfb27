"""CUDA-graph buckets (modeling/cuda_graphs.py), checked on the CPU: the padded metadata and the padded forward.

Capture itself needs a GPU (tests/test_cuda.py). Everything a graph computes is checked here by running each
bucket's padded forward eagerly (`CudaGraphRunner(capture_graphs=False)`): the same padding, dummy segments, empty
segments and static buffers, with the pure-PyTorch attention instead of the flash kernel.
"""

import copy
import threading

import pytest
import torch
from reference import FP32_REL_TOL, aimv2_pair, assert_matches_reference, random_packed, siglip2_pair
from reference import aimv2_reference, siglip2_reference

from packed_vit.modeling import cuda_graphs
from packed_vit.modeling.conversion_siglip2 import convert_siglip2_state_dict
from packed_vit.modeling.cuda_graphs import Bucket, CudaGraphRunner, _module_slots, _slots_unchanged

TOWERS = {"siglip2": (siglip2_pair, siglip2_reference), "aimv2": (aimv2_pair, aimv2_reference)}
# 1x1, elongated, video, a batch that fills its bucket exactly (no padding: every spare segment is empty), and
# one that pads (a dummy segment); the same patch grids as the parity tests'
BATCHES = {
    "mixed": [(1, 1, 1), (1, 1, 23), (1, 19, 1), (2, 5, 7), (1, 16, 16)],
    "fills_its_bucket": [(1, 8, 8), (1, 8, 8), (1, 4, 16)],
    "one_frame_padded": [(1, 7, 9)],
}


@pytest.mark.parametrize(
    "frame_lengths",
    [[256], [256] * 4, [256] * 16, [1024], [1024] * 4, [1024] * 16, [1], [1, 1, 1], [63, 500, 2], [3000, 17], [40] * 90],
    ids=str,
)
def test_bucket_holds_the_frames_then_padding_segments(frame_lengths):
    lengths = torch.tensor(frame_lengths)
    num_tokens = int(lengths.sum())
    bucket = Bucket.fitting(num_tokens, len(lengths), int(lengths.max()))
    segments = bucket.segment_lengths(lengths)
    assert num_tokens <= bucket.tokens <= max(num_tokens * 1.125, 16)  # at most 1/8 padding (or a 16-token floor)
    assert len(segments) == bucket.segments and int(segments.sum()) == bucket.tokens
    assert torch.equal(segments[: len(lengths)], lengths)  # the real frames first, in order
    assert int(segments.max()) <= bucket.max_seqlen  # every segment within the kernels' bound
    assert (segments[len(lengths) :] >= 0).all()


@pytest.mark.parametrize("num_images,side", [(1, 16), (4, 16), (16, 16), (1, 32), (4, 32), (16, 32)])
def test_latency_table_batches_need_no_padding(num_images, side):
    bucket = Bucket.fitting(num_images * side * side, num_images, side * side)
    assert (bucket.tokens, bucket.segments) == (num_images * side * side, num_images)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("tower", TOWERS)
def test_padded_bucket_forward_matches_the_reference(tower, batch):
    make_pair, run_reference = TOWERS[tower]
    ref, ours = make_pair()
    ours.cuda_graphs = CudaGraphRunner(capture_graphs=False)
    hidden_states, grid_thw = random_packed(BATCHES[batch], 48)
    with torch.no_grad():
        out = ours(hidden_states, grid_thw)
        ref_last, ref_pooled = run_reference(ref, hidden_states, grid_thw)
    assert ours.cuda_graphs.replays == 1  # the bucketed forward ran, not the eager one
    assert_matches_reference(out, ref_last, ref_pooled, grid_thw, has_head=True, tol=FP32_REL_TOL)


def test_buffers_written_under_inference_mode_are_written_again_outside_it():
    ref, ours = siglip2_pair()
    ours.cuda_graphs = CudaGraphRunner(capture_graphs=False)
    hidden_states, grid_thw = random_packed(BATCHES["mixed"], 48)
    with torch.inference_mode():
        first = ours(hidden_states, grid_thw)
    with torch.no_grad():
        second = ours(hidden_states, grid_thw)  # in-place writes into the same static buffers
    assert ours.cuda_graphs.replays == 2
    torch.testing.assert_close(first.last_hidden_state, second.last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize(
    "why,call",
    [
        ("autograd records", lambda model, x, grid: model(x, grid)),
        ("hidden states asked for", lambda model, x, grid: torch.no_grad()(model)(x, grid, output_hidden_states=True)),
        ("more tokens than max_tokens", lambda model, x, grid: torch.no_grad()(model)(torch.cat([x] * 12), torch.cat([grid] * 12))),
    ],
)
def test_falls_back_to_eager(why, call):
    _, ours = siglip2_pair()
    ours.cuda_graphs = CudaGraphRunner(max_tokens=300, capture_graphs=False)
    hidden_states, grid_thw = random_packed([(1, 5, 5), (1, 2, 3)], 48)
    out = call(ours, hidden_states, grid_thw)
    assert ours.cuda_graphs.replays == 0, why
    assert torch.isfinite(out.last_hidden_state).all()


def test_captures_only_on_cuda_with_the_flash_backend():
    _, ours = siglip2_pair()
    ours.enable_cuda_graphs()
    hidden_states, grid_thw = random_packed([(1, 5, 5)], 48)
    with torch.no_grad():
        ours(hidden_states, grid_thw)  # CPU, sdpa: eager
    assert ours.cuda_graphs.replays == 0 and not ours.cuda_graphs.graphs


def test_enable_disable_and_copies():
    _, ours = siglip2_pair()
    assert ours.enable_cuda_graphs(max_tokens=4096) is ours and ours.cuda_graphs.max_tokens == 4096
    copied = copy.deepcopy(ours)  # a fresh runner with the same settings: graphs are not copied
    assert copied.cuda_graphs is not ours.cuda_graphs and copied.cuda_graphs.max_tokens == 4096
    assert ours.disable_cuda_graphs() is ours and ours.cuda_graphs is None


def test_replaced_modules_and_weights_are_seen_copied_weights_are_not():
    _, ours = siglip2_pair()
    slots = _module_slots(ours)
    ours.load_state_dict(ours.state_dict())  # copies in place: a graph reads the new values itself
    assert _slots_unchanged(slots)
    ours.encoder.layers[0].mlp.fc1.to(torch.float64)  # .data swapped on a submodule
    assert not _slots_unchanged(slots)
    slots = _module_slots(ours)
    ours.encoder.layers[1].mlp.fc2 = torch.nn.Linear(96, 64)  # a module replaced (as PEFT does)
    assert not _slots_unchanged(slots)
    slots = _module_slots(ours)
    ours.head.probe = torch.nn.Parameter(ours.head.probe.detach().clone())  # a parameter replaced
    assert not _slots_unchanged(slots)
    slots = _module_slots(ours)
    ours.encoder.layers[0].mlp.fc2.weight.data = ours.encoder.layers[0].mlp.fc2.weight.data.clone()  # memory swapped
    assert not _slots_unchanged(slots)


def test_the_runner_between_calls_sees_replaced_modules_and_swapped_memory():
    """The runner looks at the registries again only after a registration somewhere (torch's global hooks count
    them), and at the parameters' memory on every call."""
    _, ours = siglip2_pair()
    runner = CudaGraphRunner(capture_graphs=False)
    runner.slots, runner.slots_registrations = _module_slots(ours), cuda_graphs._registrations[0]
    assert runner._holds_the_same(ours)
    torch.nn.Linear(2, 2)  # registrations elsewhere: the registries are looked at again and are unchanged
    assert runner.slots_registrations != cuda_graphs._registrations[0] and runner._holds_the_same(ours)
    assert runner.slots_registrations == cuda_graphs._registrations[0]
    fc2 = ours.encoder.layers[0].mlp.fc2
    fc2.weight.data = fc2.weight.data.clone()  # memory swapped: no registration
    assert not runner._holds_the_same(ours)
    runner.slots, runner.slots_registrations = _module_slots(ours), cuda_graphs._registrations[0]
    ours.encoder.layers[1].mlp.fc2 = torch.nn.Linear(96, 64)  # a module replaced (as PEFT does)
    assert not runner._holds_the_same(ours)


@pytest.mark.parametrize("tower", TOWERS)
def test_moving_the_model_drops_its_graphs(tower):
    make_pair, _ = TOWERS[tower]
    _, ours = make_pair()
    ours.cuda_graphs = CudaGraphRunner(capture_graphs=False)
    ours.cuda_graphs.graphs["stale"] = None  # stands in for a captured graph
    ours.to(torch.float64)
    assert not ours.cuda_graphs.graphs


def test_positions_kept_for_the_same_grids_follow_in_place_weight_updates():
    ref, ours = siglip2_pair()
    ours.cuda_graphs = CudaGraphRunner(capture_graphs=False)
    hidden_states, grid_thw = random_packed(BATCHES["mixed"], 48)
    with torch.no_grad():
        ours(hidden_states, grid_thw)  # the buffers now hold this layout's positions
        table = next(p for name, p in ref.named_parameters() if name.endswith("embeddings.position_embedding.weight"))
        table.mul_(2)
        ours.load_state_dict(convert_siglip2_state_dict(ref.state_dict()))  # copies in place into ours
        out = ours(hidden_states, grid_thw)  # the same grids: must see the new table
        ref_last, ref_pooled = siglip2_reference(ref, hidden_states, grid_thw)
    assert ours.cuda_graphs.replays == 2
    assert_matches_reference(out, ref_last, ref_pooled, grid_thw, has_head=True, tol=FP32_REL_TOL)


@pytest.mark.parametrize("tower", TOWERS)
def test_new_batches_of_frame_shapes_seen_before_take_their_kept_position_rows(tower):
    """A batch of other grids builds its positions from the rows kept per frame shape: in any order, next to new
    shapes, and after an in-place update of the weights, every batch still matches the reference."""
    make_pair, run_reference = TOWERS[tower]
    ref, ours = make_pair()
    ours.cuda_graphs = CudaGraphRunner(capture_graphs=False)
    batches = [
        BATCHES["mixed"],
        [(1, 16, 16), (2, 5, 7), (1, 1, 1)],  # shapes seen before, in another order
        [(1, 5, 7), (1, 3, 3), (1, 1, 23)],  # one new shape between known ones
    ]
    with torch.no_grad():
        for step, batch in enumerate(batches + batches[1:2]):
            if step == len(batches):  # the weights change in place: kept rows are stale
                for parameter in ref.parameters():
                    parameter.mul_(1.5)
                ours.load_state_dict(ours_state_dict(tower, ref))
            hidden_states, grid_thw = random_packed(batch, 48)
            out = ours(hidden_states, grid_thw)
            ref_last, ref_pooled = run_reference(ref, hidden_states, grid_thw)
            assert_matches_reference(out, ref_last, ref_pooled, grid_thw, has_head=True, tol=FP32_REL_TOL)
    assert ours.cuda_graphs.replays == len(batches) + 1
    assert set(ours.cuda_graphs.shape_positions) == {(16, 16), (5, 7), (1, 1)}  # dropped at the update, then kept


def ours_state_dict(tower: str, ref) -> dict:
    if tower == "siglip2":
        return convert_siglip2_state_dict(ref.state_dict())
    return ref.state_dict()


def test_kept_position_rows_stay_within_max_tokens_rows():
    _, ours = siglip2_pair()
    ours.cuda_graphs = CudaGraphRunner(max_tokens=100, capture_graphs=False)
    with torch.no_grad():
        for side in range(2, 10):  # 4 + 9 + ... + 81 rows of 8 shapes: more than 100
            ours(*random_packed([(1, side, side)], 48))
    kept = ours.cuda_graphs.shape_positions
    assert sum(len(rows) for rows in kept.values()) <= 100
    assert list(kept)[-1] == (9, 9)  # the last batch's shape is kept


def test_the_graphs_fused_norm_threshold_holds_in_the_capturing_thread_only():
    """A capture lowers the fused add + norm threshold for its own thread: another thread's eager forwards keep the
    default, and overlapping captures in two threads leave it as it was."""
    from packed_vit.modeling import fused_norm

    default = fused_norm.FUSED_ADD_NORM_MIN_TOKENS
    seen_inside, entered, release = [], threading.Event(), threading.Event()

    def capture():
        with fused_norm.fused_add_norm_from(0):
            seen_inside.append(fused_norm.fused_add_norm_min_tokens())
            entered.set()
            release.wait(10)
        seen_inside.append(fused_norm.fused_add_norm_min_tokens())

    thread = threading.Thread(target=capture)
    thread.start()
    assert entered.wait(10)
    assert fused_norm.fused_add_norm_min_tokens() == default  # the other thread's capture does not reach here
    with fused_norm.fused_add_norm_from(16):  # a capture here overlaps it, and ends first
        assert fused_norm.fused_add_norm_min_tokens() == 16
    assert fused_norm.fused_add_norm_min_tokens() == default
    release.set()
    thread.join(10)
    assert seen_inside == [0, default] and fused_norm.fused_add_norm_min_tokens() == default
