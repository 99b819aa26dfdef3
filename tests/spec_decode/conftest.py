"""Fixtures the speculative-decoding tests share: the tiny checkpoints and a plain (non-speculative) engine, the
reference every speculative output is compared with."""
import pytest

from graphserve import LLM


@pytest.fixture(scope="module")
def llama_dir(tiny_model):
    return tiny_model("llama")[0]


@pytest.fixture(scope="module")
def qwen_dir(tiny_model):
    return tiny_model("qwen2")[0]


@pytest.fixture(scope="module")
def plain(llama_dir):
    return LLM(llama_dir, dtype="float32")
