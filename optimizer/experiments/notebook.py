"""Execute ``notebooks/experiments.ipynb`` in full and save it with its outputs (``python -m optimizer.experiments.notebook``).

Runs the notebook with nbclient in a kernel of this interpreter (its ``parameters`` cell as
committed: ``QUICK = False``), then writes the executed notebook back atomically. The full run
evaluates every row on 100 held-out captions and runs 13 studies (see
:func:`optimizer.experiments.article.run_article`); ``--quick`` rewrites the parameters cell first.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from optimizer.atomic import write_atomic

__all__ = ["execute_notebook"]

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "experiments.ipynb"


def execute_notebook(*, path: Path = NOTEBOOK, quick: bool = False, out: str | None = None, timeout: int = 14400) -> float:
    """Execute ``path`` in place; returns the seconds it took."""
    import nbclient
    import nbformat

    notebook = nbformat.read(str(path), as_version=4)
    if quick or out is not None:
        cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
        cell.source = f"QUICK = {quick}\nOUT = {(out or 'studies/results/experiments')!r}\n"
    started = time.perf_counter()
    nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    write_atomic(path, lambda tmp: nbformat.write(notebook, tmp))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    print(f"executed {NOTEBOOK} in {execute_notebook(quick=args.quick, out=args.out):.0f} s")


if __name__ == "__main__":
    main()
