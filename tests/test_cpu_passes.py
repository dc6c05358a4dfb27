"""CPU inference of many frames runs in passes of at most `cpu_tokens_per_pass()` tokens (packed_model.py): the
same outputs as one pass over all of them. (Parity with the reference: test_*_parity.py, whose batches run in one
pass or several depending on the threads torch computes with.)"""

import pytest
import torch
from reference import aimv2_pair, random_packed, siglip2_pair

from packed_vit.modeling import packed_model

# 480 + 12 tokens, then 48 + 30 + 25 (a 2-frame video among them), then 600 alone (larger than a pass)
GRIDS = [(1, 24, 20), (1, 3, 4), (2, 4, 6), (1, 30, 1), (1, 5, 5), (1, 20, 30)]


def model_counting_passes(pair, monkeypatch, limit: int | None = 512):
    """(model, its packed inputs for GRIDS, the token count of each pass it makes), passes of at most `limit` tokens
    (None: the real limit)."""
    _, ours = pair()
    config = ours.config
    hidden_states, grid_thw = random_packed(GRIDS, config.num_channels * config.patch_size**2)
    passes = []
    encode = ours.encode
    def counted_encode(embeddings, *args):
        passes.append(len(embeddings))
        return encode(embeddings, *args)

    monkeypatch.setattr(ours, "encode", counted_encode)
    if limit is not None:
        monkeypatch.setattr(packed_model, "cpu_tokens_per_pass", lambda: limit)
    return ours, hidden_states, grid_thw, passes


@pytest.mark.parametrize("pair", [siglip2_pair, aimv2_pair], ids=["siglip2", "aimv2"])
def test_passes_equal_one_pass(pair, monkeypatch):
    ours, hidden_states, grid_thw, passes = model_counting_passes(pair, monkeypatch)
    config = ours.config
    with torch.no_grad():
        split = ours(hidden_states, grid_thw, output_hidden_states=True)
        assert passes == [492, 103, 600]
        monkeypatch.setattr(packed_model, "cpu_tokens_per_pass", lambda: 1 << 40)
        whole = ours(hidden_states, grid_thw, output_hidden_states=True)
        assert passes[3:] == [len(hidden_states)]
    torch.testing.assert_close(split.last_hidden_state, whole.last_hidden_state, rtol=1e-5, atol=1e-5)
    if whole.pooler_output is not None:
        assert split.pooler_output.shape == whole.pooler_output.shape == (7, config.hidden_size)  # one per frame
        torch.testing.assert_close(split.pooler_output, whole.pooler_output, rtol=1e-5, atol=1e-5)
    assert len(split.hidden_states) == len(whole.hidden_states) == config.num_hidden_layers + 1
    for a, b in zip(split.hidden_states, whole.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_one_pass_with_autograd_or_in_a_process_group(tmp_path, monkeypatch):
    """Training keeps one pass, and so does any process group: under FSDP every pass gathers each layer's weights,
    and ranks with different batches would make different numbers of passes (their collectives would hang)."""
    ours, hidden_states, grid_thw, passes = model_counting_passes(siglip2_pair, monkeypatch)
    ours(hidden_states, grid_thw).pooler_output.sum().backward()
    assert passes == [len(hidden_states)]
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with torch.no_grad():
            ours(hidden_states, grid_thw)
    finally:
        torch.distributed.destroy_process_group()
    assert passes == [len(hidden_states)] * 2


@pytest.mark.parametrize("threads,expected_passes", [(1, [492, 103, 600]), (2, [595, 600]), (3, [1195])])
def test_passes_grow_with_the_threads_torch_computes_with(threads, expected_passes, monkeypatch):
    ours, hidden_states, grid_thw, passes = model_counting_passes(siglip2_pair, monkeypatch, limit=None)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            ours(hidden_states, grid_thw)
    finally:
        torch.set_num_threads(saved)
    assert passes == expected_passes
