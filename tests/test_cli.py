"""The maxjax command end to end in subprocesses: embed, speak, convert + generate from the store."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def maxjax(*args, timeout=600):
    result = subprocess.run([sys.executable, "-m", "maxjax.cli", *args], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_embed_prints_a_vector_or_a_similarity_matrix(minilm_dir):  # the default model
    one = maxjax("embed", "The quick brown fox jumps over the lazy dog.")
    vector = np.array(json.loads(one.stdout))
    assert vector.shape == (384,) and abs(np.linalg.norm(vector) - 1) < 1e-4
    np.testing.assert_allclose(vector[:4], [0.043934, 0.058934, 0.048178, 0.077548], atol=1e-5)
    many = maxjax("embed", "a cat", "a kitten", "stock markets").stdout.splitlines()
    assert many[0] == "cosine similarity" and len(many) == 4
    sims = np.array([[float(x) for x in line.split()[-3:]] for line in many[1:]])
    np.testing.assert_allclose(np.diag(sims), 1.0, atol=1e-3)
    assert sims[0, 1] > sims[0, 2]


def test_speak_writes_a_24khz_wav(tmp_path):
    import soundfile

    out = tmp_path / "out.wav"
    result = maxjax("speak", "Hello from maxjax.", "-o", str(out))
    assert "RANDOM" in result.stderr  # says that no checkpoint was given
    assert f"wrote {out}" in result.stderr and "reading the speech model" in result.stderr  # progress lines
    summary = json.loads(result.stdout)  # the summary goes to stdout
    assert summary["path"] == str(out) and summary["sample_rate"] == 24000
    audio, rate = soundfile.read(out)
    assert rate == 24000 and audio.ndim == 1 and audio.size > 0


def test_convert_then_generate_from_the_store(tmp_path, smollm2_gguf):
    maxjax("convert", str(smollm2_gguf), "--name", "smol", "--models-dir", str(tmp_path))
    assert (tmp_path / "smol" / "config.json").is_file()
    result = maxjax("generate", "What is the capital of France?", "--model", str(tmp_path / "smol"),
                    "--max-new-tokens", "16", "--max-seq-len", "256")
    assert result.stdout.strip() == "The capital of France is Paris."
