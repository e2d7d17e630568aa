"""The CLI's persistent compilation cache: on by default in the user's cache directory, off on
request, a user's own JAX setting kept; a second run of a config loads every program (nothing
new is written) and reproduces the first run's numbers."""

import json
import os
import subprocess
import sys

import jax
import pytest

from arca_jax.trainer import setup

RUN = ["train.steps=2", "rollout.prompts_per_step=2", "rollout.group_size=2",
       "rollout.max_new_tokens=16", "rollout.max_prompt_tokens=15", "task.num_eval_problems=2",
       "task.max_train_samples=16", "train.save_every=0", "train.eval_every=0",
       "train.samples_every=0", "grpo.weighting=arca"]
KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_compilation_cache_max_size")


@pytest.fixture
def jax_cache_config():
    """Restores JAX's cache settings (use_compilation_cache changes them process-wide)."""
    from jax._src import compilation_cache

    saved = {k: getattr(jax.config, k) for k in KEYS}
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    for k, v in saved.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


def test_default_directory_off_switch_and_user_setting(tmp_path, jax_cache_config):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert setup.use_compilation_cache({**env, setup.CACHE_ENV: "off"}) is None
    assert setup.use_compilation_cache({**env, setup.CACHE_ENV: "0"}) is None
    assert jax.config.jax_compilation_cache_dir is None

    path = setup.use_compilation_cache(env)
    assert path == str(tmp_path / "xdg" / "arca-jax" / "xla") == setup.default_cache_dir(env)
    # the CPU kernels and the stored programs live beside it
    from arca_jax.qwen3 import cpu_kernels
    assert cpu_kernels.kernel_dir(env) == str(tmp_path / "xdg" / "arca-jax" / "kernels")
    home = setup.default_cache_dir({})
    assert home == os.path.join(os.path.expanduser("~"), ".cache", "arca-jax", "xla")
    assert os.path.isdir(path) and jax.config.jax_compilation_cache_dir == path
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert jax.config.jax_compilation_cache_max_size == setup.CACHE_MAX_BYTES  # bounded, locked

    # a minimum compile time the user gave JAX is kept
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.5)
    assert setup.use_compilation_cache({**env, setup.MIN_COMPILE_TIME_ENV: "2.5"}) == path
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.5

    # a directory the user configured for JAX is kept, whatever ARCA_JAX_COMPILATION_CACHE says
    assert setup.use_compilation_cache({setup.CACHE_ENV: str(tmp_path / "other")}) == path
    jax.config.update("jax_compilation_cache_dir", None)
    assert setup.use_compilation_cache({setup.CACHE_ENV: str(tmp_path / "other")}) == str(
        tmp_path / "other")


def test_unwritable_location_runs_without_cache(tmp_path, jax_cache_config):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert setup.use_compilation_cache({setup.CACHE_ENV: str(blocker / "xla")}) is None
    assert jax.config.jax_compilation_cache_dir is None


def _train(run_dir, env):
    args = [sys.executable, "-m", "arca_jax", "train", "--output-dir", str(run_dir)]
    for o in RUN:
        args += ["--set", o]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items()
                 if not (k.startswith("time_") or k.endswith("_per_s") or k == "step_time_s")}
                for line in f]


def _entries(path):
    return sorted(n for n in os.listdir(path) if n.endswith("-cache"))


@pytest.mark.slow
def test_second_run_loads_every_program_and_reproduces_the_first(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (
        setup.CACHE_ENV, "JAX_COMPILATION_CACHE_DIR", setup.MIN_COMPILE_TIME_ENV)}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    first = _train(tmp_path / "a", env)
    cache = setup.default_cache_dir(env)
    written = _entries(cache)
    assert written, "the first run cached nothing"
    second = _train(tmp_path / "b", env)
    assert _entries(cache) == written  # every program of the second run came from the cache
    assert second == first
