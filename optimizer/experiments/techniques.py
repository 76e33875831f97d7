"""The measured effect of each technique around merging, on the zoo (``python -m optimizer.experiments.techniques``).

Rows (all on the same held-out captions and seeds): the parents; a Checkpoint-Merger weighted sum
of two fine-tunes; the output ensemble of the same two (0.5/0.5 and the article's 0.6/0.4, at twice
the UNet evaluations); the base with the zoo LoRA and with the zoo hypernetwork at two strengths;
weighted sums with and without AdaBN/REPAIR-style recalibration, for two fine-tunes of one base and
for the negative control (two different initialisations). Writes ``techniques.csv`` and
``techniques.md`` (the table) into the output folder, atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from optimizer.atomic import write_text_atomic
from optimizer.zoo import paths
from optimizer.zoo.adapters import adapter_file
from optimizer.zoo.candidates import Candidate, CandidateEvaluator

__all__ = ["technique_candidates", "run_techniques"]

COLUMNS = ["label", "oracle_digit", "oracle_fg", "oracle_bg", "oracle_thickness", "oracle_slant", "oracle_all", "clip_score",
           "unet_evals_per_image", "seconds_per_image", "prepare_seconds"]


def technique_candidates(zoo: Path) -> list[Candidate]:
    lora = str(adapter_file(zoo, "lora-colour"))
    hyper = str(adapter_file(zoo, "hyper-clean"))
    pair = ("shape", "colour")
    return [
        Candidate("base", ("base",)),
        Candidate("shape", ("shape",)),
        Candidate("colour", ("colour",)),
        Candidate("merge shape+colour 0.5", pair, 0.5),
        Candidate("ensemble shape+colour 0.5/0.5", pair, 0.5, technique="output_ensemble"),
        Candidate("ensemble shape+colour 0.6/0.4", pair, 0.4, technique="output_ensemble"),
        Candidate("base + LoRA colour x0.5", ("base",), loras=((lora, 0.5),)),
        Candidate("base + LoRA colour x1.0", ("base",), loras=((lora, 1.0),)),
        Candidate("base + hypernetwork clean x0.5", ("base",), hypernetworks=((hyper, 0.5),)),
        Candidate("base + hypernetwork clean x1.0", ("base",), hypernetworks=((hyper, 1.0),)),
        Candidate("merge shape+colour 0.5 + recalibrate", pair, 0.5, recalibrate=True),
        Candidate("merge base+other_init 0.5", ("base", "other_init"), 0.5),
        Candidate("merge base+other_init 0.5 + recalibrate", ("base", "other_init"), 0.5, recalibrate=True),
    ]


def run_techniques(*, out: Path, zoo: Path | None = None, count: int = 100, steps: int = 20, progress: bool = True):
    """Evaluate :func:`technique_candidates`; write the CSV and the Markdown table; return the DataFrame."""
    zoo = Path(zoo or paths.default_zoo_dir())
    evaluator = CandidateEvaluator(zoo=zoo, count=count, steps=steps)
    frame = evaluator.evaluate_all(technique_candidates(zoo), progress=progress)[COLUMNS]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "techniques.csv", frame.to_csv(index=False))
    write_text_atomic(out / "techniques.md", frame.to_markdown(index=False, floatfmt=".3f") + "\n")
    return frame


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("studies/results"))
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    print(run_techniques(out=args.out, count=args.count, steps=args.steps).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
