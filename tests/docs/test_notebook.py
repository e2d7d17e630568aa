"""CI executes the Colab notebook's tiny part (the Qwen3-1.7B cells are guarded by RUN_BIG = False)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from fixtures import REPO

NOTEBOOK = os.path.join(REPO, "experiments", "colab.ipynb")


@pytest.mark.slow
def test_colab_notebook_tiny_part_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCA_DEMO_STEPS", "2")
    monkeypatch.setenv("ARCA_DEMO_EVAL", "4")
    monkeypatch.setenv("ARCA_DEMO_OUT", str(tmp_path / "runs"))
    monkeypatch.setenv("ARCA_DEMO_SET", "rollout.prompts_per_step=2,rollout.group_size=2,"
                                        "rollout.max_new_tokens=24,train.samples_every=1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert any("big" in c.metadata.get("tags", []) for c in nb.cells)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plots were shown
    for arm in ("uniform", "arca"):
        assert os.path.exists(tmp_path / "runs" / arm / "summary.json")
    assert os.path.exists(tmp_path / "runs" / "report" / "heatmap.html")
