"""The shape of kvcli/serve (issue 12): each module does what its docstring says, imports
point one way (no `profiling` <-> `service` circle), the manager touches no files or devices,
and the service parses no HTTP bodies."""

import ast
import inspect
from pathlib import Path

import pytest

SERVE = Path(__file__).resolve().parents[1] / "kvcli" / "serve"


def imports(module: str) -> set[str]:
    """Every module name imported by kvcli/serve/<module>.py, TYPE_CHECKING blocks included."""
    tree = ast.parse((SERVE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


# Lower modules first: each may import only those before it (and nothing of the HTTP stack
# below the server).
ORDER = ["manager", "tiers", "token", "requests", "profiling", "service", "server", "client"]


@pytest.mark.parametrize("module", ORDER)
def test_serve_imports_point_down_only(module):
    mine = {name.split(".")[2] for name in imports(module) if name.startswith("kvcli.serve.")}
    above = set(ORDER[ORDER.index(module) :]) - {module}
    if module == "client":  # the client is stdlib + the token file, nothing of the server
        assert mine <= {"token"}, mine
    else:
        assert not mine & above, f"{module} imports {mine & above}"


def test_the_manager_is_bookkeeping_only():
    names = imports("manager")
    assert not {n for n in names if n.split(".")[0] in {"os", "tempfile", "shutil", "torch", "pathlib", "io"}}, names
    source = (SERVE / "manager.py").read_text()
    assert "open(" not in source and "cuda" not in source


def test_the_profiler_gets_what_it_needs_not_the_service():
    from kvcli.serve.profiling import AgreementProfiler

    parameters = inspect.signature(AgreementProfiler).parameters
    assert "service" not in parameters and {"model", "configs", "documents", "recent_questions"} <= set(parameters)
    assert not any(n.startswith("kvcli.serve.service") for n in imports("profiling"))


def test_the_service_parses_no_request_bodies():
    from kvcli.serve.service import ModelService

    assert not {n for n in imports("service") if n.split(".")[0] in {"starlette", "uvicorn", "http"}}
    for name in ("ask", "compress"):
        parameters = inspect.signature(getattr(ModelService, name)).parameters
        assert "body" not in parameters and "request" in parameters
    source = (SERVE / "service.py").read_text()
    assert "json.loads(raw" not in source and "body.get(" not in source
