"""The TTT block mask written down directly must be the one create_block_mask derives from ttt_mask."""

import pytest
import torch

from trainer import draft


def _used(num: torch.Tensor, indices: torch.Tensor) -> list[list[int]]:
    """Per q block, the set of kv blocks listed (only the first `num` entries count)."""
    num, indices = num.reshape(-1, *num.shape[-1:]), indices.reshape(-1, *indices.shape[-2:])
    return [sorted(indices[0, i, : int(num[0, i])].tolist()) for i in range(indices.shape[1])]


@pytest.mark.parametrize("seq,steps", [(128, 1), (256, 1), (384, 3), (512, 7)])
def test_written_block_mask_matches_create_block_mask(seq, steps):
    from torch.nn.attention.flex_attention import create_block_mask

    kv_len = seq * steps
    draft._ttt_block_mask.cache_clear()
    written = draft._ttt_block_mask(seq, kv_len, torch.device("cpu"))
    derived = create_block_mask(lambda b, h, q, kv: draft.ttt_mask(q, kv, seq), None, None, seq, kv_len, device="cpu")

    assert _used(written.kv_num_blocks, written.kv_indices) == _used(derived.kv_num_blocks, derived.kv_indices)
    assert _used(written.full_kv_num_blocks, written.full_kv_indices) == _used(
        derived.full_kv_num_blocks, derived.full_kv_indices
    )
    # the q-side index (backward pass) follows from the same tiles
    assert _used(written.q_num_blocks, written.q_indices) == _used(derived.q_num_blocks, derived.q_indices)
    assert torch.equal(written.to_dense(), derived.to_dense())


def test_hand_counted_tiles():
    # 3 q blocks, 2 copies of the keys: q block 1 has kv tile 0 full, tiles 1 and 4 partial
    partial, full = draft.ttt_block_index(3, 2, "cpu")
    assert partial[1].nonzero().flatten().tolist() == [1, 4]
    assert full[1].nonzero().flatten().tolist() == [0]
    assert full[0].sum() == 0 and full[2].nonzero().flatten().tolist() == [0, 1]


def test_unaligned_seq_falls_back_to_create_block_mask():
    draft._ttt_block_mask.cache_clear()
    mask = draft._ttt_block_mask(200, 400, torch.device("cpu"))
    dense = mask.to_dense()[0, 0]
    assert dense.shape == (2, 4)  # ceil(200/128) q blocks, ceil(400/128) kv blocks
