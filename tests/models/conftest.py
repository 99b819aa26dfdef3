"""Session-scoped fixtures for the model tests (checkpoints are built once, on first use)."""
import pytest
import torch
from model_testutils import PROMPT_LEN, TINY, TinyCheckpoints


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory fixture: tiny_checkpoint("llama") -> (dir, hf_model)."""
    return TinyCheckpoints(tmp_path_factory)


@pytest.fixture(scope="session")
def prompt_ids():
    """A fixed random prompt longer than the sliding windows under test."""
    return torch.randint(0, TINY["vocab_size"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(1))
