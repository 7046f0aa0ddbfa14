from __future__ import annotations

import torch

from nemolite.checkpoint.host_memory import HUGE_PAGE, move_to_huge_pages


def test_large_tensors_move_into_one_aligned_arena_keeping_values(monkeypatch):
    big = torch.nn.Parameter(torch.randn(1024, 1024), requires_grad=False)  # 4 MB
    other = torch.randn(700, 1024).bfloat16()  # 1.4 MB: below the threshold, left alone
    bigger = torch.randn(3, 1024, 1024)
    values = [big.detach().clone(), bigger.clone()]
    other_pointer = other.data_ptr()
    moved = move_to_huge_pages([big, other, bigger])
    if moved == 0:  # no madvise here (not Linux): nothing may change
        return
    assert moved >= 4 * 2**20 + 12 * 2**20
    assert big.data_ptr() % HUGE_PAGE == 0 and other.data_ptr() == other_pointer
    assert torch.equal(big, values[0]) and torch.equal(bigger, values[1])
    assert isinstance(big, torch.nn.Parameter)
    monkeypatch.setenv("NEMOLITE_HUGE_PAGES", "0")
    assert move_to_huge_pages([torch.randn(1024, 1024)]) == 0
