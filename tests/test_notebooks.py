"""Every notebook in experiments/notebooks/ runs top to bottom without a cell error.

Each notebook is executed with nbclient on a temporary copy of the notebooks folder (so the
committed outputs and figures stay untouched) at a tiny scale: DSJ_NOTEBOOK_SCALE shrinks the
training steps (0.02: every run takes its minimum, its warmup length), DSJ_NOTEBOOK_WORKDIR /
DSJ_NOTEBOOK_FIGURES keep runs and PNGs in the temp dir.
The committed notebooks are executed separately at their default SCALE (README there).
"""
import glob
import os
import shutil

import pytest

from tests.xla_flags import FAST_COMPILE, without

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "experiments", "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
SCALE = os.environ.get("DSJ_TEST_NOTEBOOK_SCALE", "0.02")
# At tiny scale most notebooks are mostly XLA compile time, which FAST_COMPILE cuts (same
# programs; load_balancing as a script on an empty cache: 92 -> 67 CPU s with -O0 alone);
# grpo_variants' sampling is real compute: 73 s alone as it is, 112 s with FAST_COMPILE.
COMPUTE_BOUND = {"grpo_variants.ipynb"}


def test_there_are_notebooks():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert {"mla_vs_gqa_vs_mha.ipynb", "load_balancing.ipynb", "mtp.ipynb", "grpo_variants.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_notebook_has_outputs_and_a_conclusion(path):
    """The committed copy was executed (every code cell has a count, none has an error) and
    ends with a written conclusion."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code), "execute the notebook before committing it"
    for c in code:
        for out in c.get("outputs", []):
            assert out.get("output_type") != "error", f"committed notebook has an error output: {out}"
    first = code[0].source
    assert "DSJ_NOTEBOOK_SCALE" in first and "SCALE" in first, "the first cell must read SCALE"
    last = nb.cells[-1]
    assert last.cell_type == "markdown" and "conclusion" in last.source.lower()
    assert "PLACEHOLDER" not in last.source and "TODO" not in last.source


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes_at_tiny_scale(path, tmp_path):
    work = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOK_DIR, work, ignore=shutil.ignore_patterns("figures", "*.png", ".ipynb_checkpoints"))
    copy = work / os.path.basename(path)
    nb = nbformat.read(copy, as_version=4)
    for c in nb.cells:  # run from a clean slate: the test must not read the committed outputs
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    env = {"DSJ_NOTEBOOK_SCALE": SCALE, "DSJ_NOTEBOOK_WORKDIR": str(tmp_path / "runs"),
           "DSJ_NOTEBOOK_FIGURES": str(tmp_path / "figures"),
           # One CPU device, as on a laptop: conftest's 8 virtual devices only slow the kernel down.
           # (conftest's FAST_COMPILE is dropped too: COMPUTE_BOUND decides it per notebook.)
           "XLA_FLAGS": without(os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count",
                                *FAST_COMPILE)}
    if os.path.basename(path) not in COMPUTE_BOUND:
        env["XLA_FLAGS"] = " ".join([env["XLA_FLAGS"], *FAST_COMPILE]).strip()
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                         resources={"metadata": {"path": str(work)}})
        client.execute()  # raises CellExecutionError on the first failing cell
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    pngs = list((tmp_path / "figures").glob("*.png"))
    assert pngs, "the notebook should save its figures"
