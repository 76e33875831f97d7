"""Copy the experiment tables the notebook produced into README.md (``python -m optimizer.experiments.readme``).

The README's Experiments section is the text between ``<!-- experiments:start -->`` and
``<!-- experiments:end -->``: exactly ``studies/results/experiments/experiments.md`` as the executed
notebook wrote it, never numbers typed by hand. ``tests/test_notebook.py`` checks that they agree.
"""

from __future__ import annotations

from pathlib import Path

from optimizer.atomic import write_text_atomic

__all__ = ["END", "START", "readme_section", "sync_readme"]

REPO = Path(__file__).resolve().parents[2]
START = "<!-- experiments:start -->"
END = "<!-- experiments:end -->"
RESULTS = REPO / "studies" / "results" / "experiments" / "experiments.md"


def readme_section(text: str) -> str:
    """The text between the markers of ``text`` (ValueError if they are missing or out of order)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md needs {START} ... {END} around the Experiments tables")
    return text[start + len(START) : end].strip("\n")


def sync_readme(*, readme: Path = REPO / "README.md", results: Path = RESULTS) -> Path:
    """Replace the README's section by ``results`` (atomically)."""
    text = readme.read_text(encoding="utf-8")
    readme_section(text)  # the markers must exist
    table = results.read_text(encoding="utf-8").strip("\n")
    start, end = text.find(START), text.find(END)
    new = text[: start + len(START)] + "\n" + table + "\n" + text[end:]
    return write_text_atomic(readme, new)


if __name__ == "__main__":
    print(f"updated {sync_readme()}")
