"""The article experiments (issue 7): summary statistics, claims, study files, and the notebook in quick mode.

The notebook test executes ``notebooks/experiments.ipynb`` with nbclient (a real kernel of this
interpreter) with its ``parameters`` cell rewritten to ``QUICK = True`` and a temporary ``OUT``;
it renders on the zoo (about two minutes on 2 CPU cores).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from optimizer.experiments.article import ARTICLE_ALPHA, claims, summarize, sweep_candidates
from optimizer.experiments.article_settings import EXPERIMENTS, STUDIES
from optimizer.experiments.article_studies import overridden_study_config
from optimizer.study.config import load_study_config
from optimizer.zoo import paths

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "experiments.ipynb"
needs_zoo = pytest.mark.skipif(not (paths.default_zoo_dir() / paths.MANIFEST).is_file(), reason="studies/zoo is not built (evomerge zoo build)")

# Student's t, 2 degrees of freedom, has the closed form t_p = (2p - 1) / sqrt(2 p (1 - p))
T_975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # 4.3026527...


def test_summarize_mean_and_t_interval_on_known_numbers() -> None:
    frame = pd.DataFrame([
        {"label": "opt", "group": "optimized", "search_seed": 0, "oracle_all": 1.0, "mbw": "a"},
        {"label": "single", "group": "merge", "search_seed": math.nan, "oracle_all": 5.0, "mbw": "s"},
        {"label": "opt", "group": "optimized", "search_seed": 1, "oracle_all": 2.0, "mbw": "b"},
        {"label": "opt", "group": "optimized", "search_seed": 2, "oracle_all": 3.0, "mbw": "c"},
    ])
    out = summarize(frame, by="label")
    assert list(out["label"]) == ["opt", "single"]  # first-appearance order
    opt, single = out.iloc[0], out.iloc[1]
    # mean 2, sample sd 1, half-width t_{0.975, 2} * 1 / sqrt(3)
    assert opt["n"] == 3 and opt["oracle_all"] == pytest.approx(2.0)
    assert opt["oracle_all_ci95"] == pytest.approx(T_975_DF2 / math.sqrt(3), rel=1e-9)
    assert opt["group"] == "optimized" and pd.isna(opt["mbw"])  # differs across seeds: missing
    assert single["n"] == 1 and single["oracle_all"] == 5.0 and math.isnan(single["oracle_all_ci95"])
    assert single["mbw"] == "s"
    assert "search_seed_ci95" not in out.columns


def test_summarize_two_seeds_and_explicit_metrics() -> None:
    frame = pd.DataFrame({"label": ["x", "x"], "clip_score": [10.0, 14.0], "alpha": [0.5, 0.5]})
    out = summarize(frame, by="label", metrics=["clip_score"])
    # df 1: t_{0.975, 1} = tan(pi * 0.475) = 12.7062...; sd = 2 * sqrt(2); half = t * sd / sqrt(2) = 2 t
    assert out.loc[0, "clip_score"] == pytest.approx(12.0)
    assert out.loc[0, "clip_score_ci95"] == pytest.approx(2 * math.tan(math.pi * 0.475), rel=1e-9)
    assert out.loc[0, "alpha"] == 0.5 and "alpha_ci95" not in out.columns
    with pytest.raises(ValueError, match="no column"):
        summarize(frame, by="nope")


def _row(label: str, all_five: float, *, images: int = 100, n: int = 1, ci: float = math.nan, group: str = "", alpha: float = math.nan):
    return {"label": label, "oracle_all": all_five, "clip_score": 50.0, "images": images, "n": n, "oracle_all_ci95": ci,
            "group": group, "alpha": alpha}


def test_claims_verdicts_follow_the_interval() -> None:
    summary = pd.DataFrame([
        _row("base", 0.40), _row("other_init", 0.30), _row("shape", 0.10), _row("colour", 0.05),
        _row("merge shape+colour 0.5", 0.45, group="merge", alpha=0.5),
        _row("ensemble shape+colour 0.6/0.4", 0.12, group="ensemble", alpha=ARTICLE_ALPHA),
        _row("control base+other_init 0.5", 0.0, group="control", alpha=0.5),
        _row("optimized blocks-tpe", 0.47, n=3, ci=0.01),
    ])
    found = {c.claim.split(" ")[0]: c for c in claims(summary)}
    assert found["(1)"].reference == "shape" and found["(1)"].verdict == "holds"
    assert found["(1')"].candidate == "merge shape+colour 0.5"
    assert found["(2)"].verdict.startswith("not shown")  # 0.12 vs 0.10 on 100 images
    assert found["(2')"].verdict.startswith("does not hold")
    assert found["(control)"].reference == "base" and found["(control)"].verdict.startswith("does not hold")
    tpe = next(c for c in claims(summary) if c.candidate == "optimized blocks-tpe")
    assert tpe.verdict.startswith("not shown") and tpe.low < 0 < tpe.high
    assert "oracle_all 0.450 vs 0.100" in found["(1)"].text


def test_sweep_candidates_include_the_article_rows() -> None:
    rows = sweep_candidates(alphas=(0.0, 1.0))
    labels = [c.label for c in rows]
    assert labels[:4] == ["base", "shape", "colour", "other_init"]
    assert "merge shape+colour 0.5" in labels and "control base+other_init 0.5" in labels
    article = [c for c in rows if c.extra["article"]]
    assert {c.label for c in article} == {"merge shape+colour 0.5", "ensemble shape+colour 0.6/0.4"}
    ensemble = next(c for c in rows if c.label == "ensemble shape+colour 0.6/0.4")
    assert ensemble.technique == "output_ensemble" and ensemble.alpha == pytest.approx(0.4) and ensemble.parents == ("shape", "colour")


def test_every_experiment_study_file_validates() -> None:
    files = sorted(EXPERIMENTS.glob("*.yaml"))
    names = {f.name for f in files}
    assert {*STUDIES.values(), "article-pareto-nsga2.yaml", "article-sd15.yaml"} <= names
    for file in files:
        config = load_study_config(file)
        assert config.name == file.stem
    sd15 = load_study_config(EXPERIMENTS / "article-sd15.yaml")
    clip_model = sd15.scorers.model_dump().get("clip_model", "ViT-L-14")  # ViT-L-14 is the default, so it is not stored
    assert (sd15.dtype, sd15.device, sd15.render.batch_size, clip_model) == ("fp16", "cuda", "auto", "ViT-L-14")
    assert sd15.scorers.aesthetic_head and [o.name for o in sd15.objectives] == ["clip", "aesthetic"]
    pareto = load_study_config(EXPERIMENTS / "article-pareto-nsga2.yaml")
    assert pareto.mode == "pareto" and pareto.sampler.name == "nsga2" and pareto.scorers.features == "clip"
    assert load_study_config(EXPERIMENTS / STUDIES["blocks-cmaes"]).sampler.name == "cmaes"
    assert load_study_config(EXPERIMENTS / STUDIES["global-tpe"]).search_space["alpha"].share == "global"
    for key in STUDIES:  # the zoo studies point at the committed zoo files
        config = load_study_config(EXPERIMENTS / STUDIES[key])
        assert all(Path(p).parent == paths.default_zoo_dir() / "models" for p in config.parents)


def test_study_overrides_keep_the_file_and_change_budget_and_seed(tmp_path: Path) -> None:
    config = overridden_study_config(STUDIES["blocks-tpe"], name="x-seed2", seed=2, trials=4, prompts=str(tmp_path / "p.yaml"))
    original = load_study_config(EXPERIMENTS / STUDIES["blocks-tpe"])
    assert (config.name, config.sampler.seed, config.budget.trials, config.prompts) == ("x-seed2", 2, 4, str(tmp_path / "p.yaml"))
    assert config.search_space == original.search_space and config.parents == original.parents
    assert config.sampler.options == original.sampler.options and config.warm_start == original.warm_start


@needs_zoo
def test_notebook_runs_in_quick_mode(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1 and "QUICK = False" in parameters[0].source
    out = tmp_path / "experiments"
    parameters[0].source = f"QUICK = True\nOUT = {str(out)!r}\n"
    client = nbclient.NotebookClient(notebook, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute()

    table = pd.read_csv(out / "experiments.csv")
    labels = set(table["label"])
    expected = {"base", "shape", "colour", "other_init", "merge shape+colour 0.5", "ensemble shape+colour 0.6/0.4",
                "control base+other_init 0.5", *(f"optimized {k}" for k in STUDIES)}
    assert expected <= labels
    assert len(table[table["group"] == "merge"]) == 5  # quick: alpha 0, 0.25, ..., 1
    assert {"merge shape+colour 0.5 + recalibrate", "control base+other_init 0.5 + recalibrate"} <= labels
    assert table["fid"].notna().all()
    optimized = table[table["group"] == "optimized"]
    assert (optimized["n"] == 2).all() and optimized["oracle_all_ci95"].notna().all()
    ensemble = table.set_index("label").loc["ensemble shape+colour 0.6/0.4"]
    assert ensemble["unet_evals_per_image"] == 2 * table.set_index("label").loc["merge shape+colour 0.5", "unet_evals_per_image"]
    assert table["oracle_all"].between(0, 1).all()
    markdown = (out / "experiments.md").read_text(encoding="utf-8")
    assert "| merge shape+colour 0.5 |" in markdown and "Pareto front" in markdown
    for name in ("alpha_sweep.png", "histories.png", "block_weights.png", "pareto.png", "grid.png"):
        assert (out / name).stat().st_size > 1000
    assert not list(out.glob(".*"))  # atomic writes left no temporary files

    claims_cell = next(c for c in notebook.cells if "claims" in c.metadata.get("tags", []))
    text = "".join(o.get("data", {}).get("text/markdown", "") for o in claims_cell.outputs)
    assert "In short" in text and "claim 1:" in text and "claim 2:" in text
    assert any(v in text for v in ("holds", "does not hold", "not shown"))
    assert "oracle_all" in text


def test_the_readme_experiments_section_is_the_table_the_notebook_wrote() -> None:
    from optimizer.experiments.readme import RESULTS, readme_section

    if not RESULTS.is_file():
        pytest.skip("studies/results/experiments/experiments.md has not been produced (run the notebook)")
    section = readme_section((REPO / "README.md").read_text(encoding="utf-8"))
    assert section == RESULTS.read_text(encoding="utf-8").strip("\n")
