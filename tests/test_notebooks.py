"""The notebooks in notebooks/ run top to bottom on tiny settings, and are committed without outputs.

Each notebook has a first code cell tagged ``parameters`` (papermill style). Here a cell that sets the
tiny values is inserted right after it, and the notebook is executed with nbclient in a temporary
working directory by a kernel running this interpreter (jupyter_client replaces the kernel spec's
``python`` with ``sys.executable``; the first test checks it). The XLA compilation cache is shared by
the notebooks of one session through pytest's cache folder, so that the two notebooks that train the
same tiny CNN compile it once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
EXPECTED = {"quickstart.ipynb", "perceptron_theory.ipynb", "reproduce_paper_tpu.ipynb"}
PROBE = "__NOTEBOOK_PROBE__"
# Generous per-cell limit: the whole suite takes a few minutes at most; a hung cell should still fail.
CELL_TIMEOUT_S = 900


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _read(name: str):
    return nbformat.read(NB_DIR / name, as_version=4)


def _params_index(nb) -> int:
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code" and "parameters" in c.metadata.get("tags", []):
            return i
    raise AssertionError("no cell tagged 'parameters'")


def _tagged(nb, tag: str) -> int:
    hits = [i for i, c in enumerate(nb.cells) if tag in c.metadata.get("tags", [])]
    assert len(hits) == 1, f"expected one cell tagged {tag!r}, found {len(hits)}"
    return hits[0]


def _cell(source: str):
    return nbformat.v4.new_code_cell(source)


def _inject(nb, params: dict) -> None:
    """Inserts the tiny parameters after the parameters cell (what papermill does)."""
    lines = ["# injected by tests/test_notebooks.py"] + [f"{k} = {v!r}" for k, v in params.items()]
    cell = _cell("\n".join(lines))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(_params_index(nb) + 1, cell)


def _probe_cell(expr: str):
    """A cell that prints a JSON object computed in the kernel, read back by :func:`_probe`."""
    return _cell(f"import json as _json\nprint({PROBE!r} + _json.dumps({expr}, default=str))")


def _probe(nb) -> dict:
    for c in reversed(nb.cells):
        for out in c.get("outputs", []):
            if out.get("output_type") == "stream" and PROBE in out.get("text", ""):
                line = [l for l in out["text"].splitlines() if l.startswith(PROBE)][-1]
                return json.loads(line[len(PROBE):])
    raise AssertionError("the probe cell printed nothing")


def _execute(nb, cwd: Path) -> None:
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()


@pytest.fixture(scope="session")
def xla_cache(request, tmp_path_factory) -> str:
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    folder = cache.mkdir("notebooks_xla_cache") if cache is not None else tmp_path_factory.mktemp("xla")
    return str(folder)


# ------------------------------------------------------------------------------------------------
# Static checks
# ------------------------------------------------------------------------------------------------


def test_all_notebooks_present():
    assert EXPECTED <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_parameters_cell_first(path):
    nb = nbformat.read(path, as_version=4)
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    assert _params_index(nb) == first_code
    src = nb.cells[first_code].source
    assert "TINY = False" in src and 'REPO_URL = "https://github.com/<org>/jaxnorm"' in src


# ------------------------------------------------------------------------------------------------
# Execution on tiny settings
# ------------------------------------------------------------------------------------------------


def test_quickstart_runs(tmp_path, xla_cache):
    nb = _read("quickstart.ipynb")
    _inject(nb, {"TINY": True, "RUN_DIR": "run", "CACHE_DIR": xla_cache})
    nb.cells.append(_probe_cell('{"executable": sys.executable, "rows": len(df), "P": sorted(df.P.unique().tolist()),'
                                ' "finished": summary.get("finished"), "jobs": summary.get("jobs")}'))
    _execute(nb, tmp_path)
    out = _probe(nb)
    # The kernel is this interpreter (so it sees the same installed jaxnorm).
    assert os.path.realpath(out["executable"]) == os.path.realpath(sys.executable)
    assert out["P"] == [32, 64] and out["finished"] == out["jobs"] == 4
    # 2 P x 2 seeds x (epoch 0, 1, 2) evaluation rows.
    assert out["rows"] == 12
    for f in ("results.csv", "config.json", "figures/fig3_curves.png", "figures/fig4_collapse.png"):
        assert (tmp_path / "run" / f).is_file(), f
    # Figures are shown inline.
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", []))


def test_perceptron_theory_runs(tmp_path, xla_cache):
    nb = _read("perceptron_theory.ipynb")
    _inject(nb, {"TINY": True, "OUT_DIR": "out", "CACHE_DIR": xla_cache})
    _execute(nb, tmp_path)
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    for f in ("fig2a_eps_vs_lambda.png", "fig2b_collapse.png", "fig1_free_norm.png", "classical_rules.png"):
        assert (tmp_path / "out" / f).is_file(), f
    # Paper Sec. 2.2: the optimum of the logistic loss reaches the Bayes-optimal error. Bayes comes from
    # the Gibbs saddle point (a different equation), so the agreement checks the notebook's optimum; the
    # tiny run uses a coarse lambda grid before the regula-falsi refinement, hence 1% rather than 1e-6.
    for a, e_opt, e_bayes in zip(s["alphas"], s["eps_opt"], s["bayes"]):
        assert abs(e_opt - e_bayes) < 0.01 * e_bayes, (a, e_opt, e_bayes)
    # lambda -> 0 is Hebb (Sec. 2.2), in closed form: eps = arccos(sqrt(2a / (2a + pi))) / pi.
    import numpy as np

    for a, e0 in zip(s["alphas"], s["eps_small_lambda"]):
        hebb = np.arccos(np.sqrt(2 * a / (2 * a + np.pi))) / np.pi
        assert abs(e0 - hebb) < 0.01 * hebb, (a, e0, hebb)  # lambda_min = 0.01: O(lambda) correction
    # Free-norm GD: the norm grows along the trajectory (implicit bias, Sec. 2.3).
    assert s["free_norm"]["lam_final"] > s["free_norm"]["lam_first"]


def test_reproduce_paper_tpu_runs_and_resumes(tmp_path, xla_cache):
    """Tiny mode: the smoke config on CPU; a simulated disconnect, then the run cell is rerun (resume),
    the rest of the notebook runs, and the run cell once more (a no-op)."""
    nb = _read("reproduce_paper_tpu.ipynb")
    _inject(nb, {"TINY": True, "WORK_DIR": "work", "CACHE_DIR": xla_cache, "STOP_AFTER_DISPATCHES": 3})
    run = _tagged(nb, "run-sweep")
    run_src = nb.cells[run].source
    after = [_cell("FIRST = summary\nSTOP_AFTER_DISPATCHES = None  # the runtime reconnects"),
             _cell(run_src), _cell("SECOND = summary")]
    nb.cells[run + 1:run + 1] = after
    nb.cells += [_cell(run_src),
                 _probe_cell('{"first": FIRST, "second": SECOND, "third": summary, "rows": len(df_all),'
                             ' "run_dir": str(RUN_DIR)}')]
    _execute(nb, tmp_path)
    out = _probe(nb)
    assert out["first"] == {"stopped": True}
    assert not out["second"].get("noop") and out["second"]["finished"] == out["second"]["jobs"] == 4
    assert out["third"].get("noop") is True
    # Resumed rows: exactly one per (replica, evaluation epoch), as an uninterrupted run (2 P x 2 seeds x 3).
    assert out["rows"] == 12
    run_dir = Path(out["run_dir"])
    if not run_dir.is_absolute():
        run_dir = tmp_path / run_dir
    assert (run_dir / "checkpoints").is_dir()
    analysis_dir = tmp_path / "work" / "analysis"
    for f in ("table1.md", "table2.md", "table1.csv", "summary.json"):
        assert (analysis_dir / f).is_file(), f
    assert list(analysis_dir.glob("figures/*/fig3_curves.png"))
