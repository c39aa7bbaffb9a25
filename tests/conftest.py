import os

import pytest
import torch

# Without a GPU, Triton kernels run through the interpreter; must be set before triton loads,
# so before anything below imports kvcli.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvcli.serve.server import make_server, server_url  # noqa: E402
from tests.support import CharTokenizer, start, tiny_service  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own kvcli cache dir: nothing a test writes outlives it."""
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(tmp_path / "kvcli-cache"))
    monkeypatch.delenv("KVCLI_SERVER", raising=False)  # a developer's running server must not answer tests


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory):
    """A cache dir shared by the tests that load the embedded model (converted once, ~20 s)."""
    return str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def default_model(model_cache_dir):
    from kvcli.models import load_model

    previous = os.environ.get("KVCLI_CACHE_DIR")
    os.environ["KVCLI_CACHE_DIR"] = model_cache_dir
    try:
        return load_model("default", device="cpu")
    finally:
        if previous is None:
            os.environ.pop("KVCLI_CACHE_DIR", None)
        else:
            os.environ["KVCLI_CACHE_DIR"] = previous


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()


# ---- a server on a tiny model (tests/test_server.py, test_serve_cli.py, test_serve_security.py)


@pytest.fixture
def service(char_tokenizer):
    return tiny_service(char_tokenizer, cpu_bytes=10**8)


@pytest.fixture
def served(service, monkeypatch):
    """A running server on a free loopback port (its token under the test's own cache dir)."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    server = make_server(service, host="127.0.0.1", port=0)
    start(server)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def url(served):
    return server_url(served)
