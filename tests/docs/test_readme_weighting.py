"""The README's "Your own token weighting" block runs as written (ARCA x surprisal trained end to
end on the embedded tiny model, with fewer and smaller steps), its weights reach samples.jsonl,
and the report reads the run: tables and a heatmap row for the user's weighting."""

import json
import math
import os
import re

import pytest

from arca_jax import credit, report
from fixtures import REPO

README = os.path.join(REPO, "README.md")
NAME = "arca_x_surprisal"
FAST = ["train.steps=2", "train.seed=3", "optim.warmup_steps=0", "rollout.prompts_per_step=2",
        "rollout.group_size=4", "rollout.max_new_tokens=24", "task.num_eval_problems=4",
        "task.max_train_samples=32", "train.save_every=0", "train.samples_every=1",
        "train.samples_per_log=2"]


def readme_block() -> str:
    """The python block that registers a weighting (found by its content, not its index)."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
              if "credit.register(" in b]
    assert len(blocks) == 1
    return blocks[0]


@pytest.fixture
def unregister():
    yield
    if NAME in credit.registered():
        credit.unregister(NAME)


@pytest.mark.slow
def test_readme_own_weighting_trains_end_to_end(tmp_path, monkeypatch, unregister):
    code = readme_block()
    assert '"train.steps=20"]' in code and f'credit.register("{NAME}"' in code
    code = code.replace('"train.steps=20"]', ", ".join(f'"{o}"' for o in FAST) + "]")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    run_dir = tmp_path / "runs" / "arca-x-surprisal"
    assert scope["summary"]["finished"] and scope["cfg"].grpo.weighting == NAME

    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    assert all(0 <= m["weight_gini"] < 1 for m in metrics)
    samples = [json.loads(line) for line in open(run_dir / "samples.jsonl")]
    assert samples
    for s in samples:
        assert set(s["weights"]) == set(credit.MODES) | {NAME}
        w = s["weights"][NAME]
        assert len(w) == len(s["tokens"]) and abs(sum(w) - 1) < 1e-4

    # the report (JAX-free) reads a run of a weighting it does not know
    run = report.load_run(run_dir)
    assert run.method == NAME
    rows = report.heatmap_rows(run.samples[0])
    assert [r.mode for r in rows] == list(credit.MODES) + [NAME]
    paths = report.write_report([run_dir], tmp_path / "report")
    assert NAME in paths.report_md.read_text() and NAME in paths.comparison_md.read_text()
    assert NAME in paths.heatmap_html.read_text()
