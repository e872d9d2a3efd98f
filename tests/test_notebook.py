"""The notebooks under notebooks/: committed without outputs, and each runs top to bottom in a Jupyter kernel.

Each notebook runs with nbclient on the real models, under a time limit for the whole notebook (every cell
gets what is left of it), and must show what it is about: its text, its plots (PNG), its audio player.
"""

import json
import os
import time
from pathlib import Path

import pytest

from conftest import require

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))

# What each notebook's outputs must contain: text (stdout, results, HTML) or a MIME type of a display.
EXPECTED = {
    "quickstart.ipynb": ["The capital of France is Paris.", '"city"', '"population"'],
    "01_text_generation.ipynb": ["Paris", "same seed, same text: True"],
    "02_scoring_logprobs.ipynb": ["image/png", "perplexity"],
    "03_structured_output_tools.ipynb": ["all valid: True", "ToolCall(name="],
    "04_embeddings.ipynb": ["image/png", "nearest"],
    "05_speech.ipynb": ["RANDOM", "<audio", "image/png"],
    "06_max_protocol.ipynb": ["image/png", "programs compiled after warmup: 0"],
    "07_many_devices.ipynb": ["8 devices", "P(None, 'data', 'model', None, None)", "identical: True",
                              "programs compiled after warmup: 0", "CPU 0,3"],
}
TIME_LIMIT_S = 600  # per notebook, cold compile cache on a loaded 2-core CI box


def test_every_notebook_has_expectations():
    assert sorted(EXPECTED) == ALL


@pytest.mark.parametrize("name", ALL)
def test_committed_notebook_has_no_outputs(name):
    cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
    dirty = [i for i, cell in enumerate(cells)
             if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{name}: cells {dirty} carry outputs; clear them before committing (Jupyter: Clear All Outputs)"


def _output_text(cell) -> str:
    """Everything a code cell showed: streams, errors, and each display's MIME types and text/HTML."""
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        data = out.get("data", {})
        parts += list(data)
        parts += [data.get(kind, "") for kind in ("text/plain", "text/html")]
    return "\n".join(p if isinstance(p, str) else "".join(p) for p in parts)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_notebook_runs(name, smollm2_gguf, minilm_dir):  # the default models
    nbclient = require("nbclient")
    nbformat = require("nbformat")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    deadline = time.monotonic() + TIME_LIMIT_S
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}},
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())))
    # The kernel imports the maxjax of this checkout, whatever is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(NOTEBOOKS.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    client.execute(env=env)  # raises CellExecutionError (with the traceback) on any cell error
    print(f"{name}: {time.perf_counter() - start:.1f} s")
    shown = "\n".join(_output_text(cell) for cell in notebook.cells if cell.cell_type == "code")
    missing = [text for text in EXPECTED[name] if text not in shown]
    assert not missing, f"{name}: outputs lack {missing}"
