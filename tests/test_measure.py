"""vit.measure: the numbers that results.json, the benchmarks and the tests share."""
from __future__ import annotations

import torch

from vit.measure import allocation_increase

MB = 10**6


def test_allocation_increase_is_the_peak_of_what_a_step_holds_at_once():
    def step():
        a = torch.ones(MB)  # 4 MB
        b = torch.ones(2 * MB)  # +8 MB while a is alive: the peak
        del a, b
        torch.ones(MB)  # 4 MB after both were freed: below the peak

    assert allocation_increase(step, torch.device("cpu")) == 12 * MB
    kept = []
    assert allocation_increase(lambda: kept.append(torch.ones(MB)), torch.device("cpu")) == 4 * MB
