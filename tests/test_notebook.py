"""The quickstart notebook runs top to bottom (its code cells, in one namespace, as a kernel would)."""

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(capsys, smollm2_gguf, minilm_dir):  # the default models
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{NOTEBOOK.name}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "The capital of France is Paris." in out
    assert '"city"' in out and '"population"' in out
