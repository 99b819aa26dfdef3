"""A real uvicorn server on 127.0.0.1 (ephemeral port) over the tiny random llama, shared by the server tests."""
import pytest
from server_testutils import API_KEY, ServerHandle, server_argv


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model):
    return tiny_model("llama")[0]


@pytest.fixture(scope="session")
def server(tiny_llama_dir):
    """The shared server: tiny llama, API key required, served as "tiny" (and "tiny-alias")."""
    handle = ServerHandle(server_argv(tiny_llama_dir, "--api-key", API_KEY, "--max-n", "4"))
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def async_client(server):
    import openai

    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
