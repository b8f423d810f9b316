import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# torch.compile's on-disk cache is keyed without the ATen CPU capability: kernels compiled
# under ATEN_CPU_CAPABILITY=default are then reused under =avx2 (and vice versa) and the
# compiled sweep disagrees with the eager one. One cache per capability (unless the user set
# one) keeps the suite right when it is run under several capabilities on one machine.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(
        tempfile.gettempdir(),
        f"funcreg-inductor-{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}",
    ),
)

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True)
def _no_vmap_fallback():
    """Every vmap fallback (slow per-sample loop) is a test failure."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread: results that depend on the thread count (BatchNorm) are compared
    at one, and another process on a 2-core box does not slow eager ops tenfold."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def load_example():
    """``load_example(name)``: an example script as a module (examples/ is not a package)."""

    def load(name):
        spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
