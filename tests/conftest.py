"""Shared test set-up: deterministic seeds and one thread per test process (the machine has 2 cores)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
