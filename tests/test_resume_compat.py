"""A run written by the code before the package move resumes bitwise with today's code.

The run directory and checkpoint formats did not change when modules moved into packages
(architecture issue): a run that the previous layout's trainer stopped at step 5 finishes under
today's trainer with the losses and final state of an uninterrupted run.
"""

import os
import subprocess
import sys

import pytest
from test_train import (
    _env,
    _experiment_file,
    _train_cmd,
    assert_trees_equal,
    corpus,
    final_state,
    losses,
    reference_run,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# main before the package move (the last commit of the flat layout)
FLAT_LAYOUT = "e3701ec"


@pytest.fixture(scope="module")
def flat_layout_source(tmp_path_factory):
    """The library as it was before the move, exported from git history."""
    dest = tmp_path_factory.mktemp("flat")
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", FLAT_LAYOUT, "llama_jax"], capture_output=True
    )
    if archive.returncode != 0:
        pytest.skip(f"commit {FLAT_LAYOUT} is not in this clone's history (a shallow clone?)")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return str(dest)


def test_flat_layout_run_resumes_bitwise(flat_layout_source, reference_run, tmp_path):
    exp, ref = reference_run
    run = tmp_path / "run"
    env = _env(2) | {"PYTHONPATH": flat_layout_source}
    old = subprocess.run(
        _train_cmd(exp, run, "--num_gpus", "2", "--config.debug_stop_after=5"),
        env=env,
        cwd=flat_layout_source,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert old.returncode == 0, old.stderr[-3000:]
    assert sorted(losses(str(run))) == [1, 2, 3, 4, 5]
    new = subprocess.run(
        _train_cmd(exp, run, "--num_gpus", "2"),
        env=_env(2) | {"PYTHONPATH": ROOT},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert new.returncode == 0, new.stderr[-3000:]
    assert "resumed from step 5" in new.stderr
    assert losses(str(run)) == losses(ref)
    assert_trees_equal(final_state(str(run))[1], final_state(ref)[1])
