"""Fixtures shared by the benchmark suites."""

import pytest
import torch


@pytest.fixture
def num_threads(request):
    """Run the benchmark with ``request.param`` torch threads (parametrize with indirect=True)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
