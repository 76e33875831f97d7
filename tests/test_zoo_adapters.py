"""The zoo's trained LoRA and hypernetwork: real trained weights, loaded and applied by evomerge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from optimizer.adapters.hypernetwork import load_hypernetwork
from optimizer.adapters.lora import load_loras
from optimizer.merge_files import load_parents
from optimizer.study.pipeline import unet_config
from optimizer.zoo import paths
from optimizer.zoo.adapters import ADAPTERS, adapter_file, train_adapters
from optimizer.zoo.build import ZooError, check_zoo
from optimizer.zoo.candidates import Candidate, CandidateEvaluator

ZOO = paths.default_zoo_dir()
MANIFEST = ZOO / "adapters" / "adapters.json"
needs_adapters = pytest.mark.skipif(not MANIFEST.is_file(), reason="studies/zoo/adapters is not built (evomerge zoo adapters)")


pytestmark = pytest.mark.usefixtures("one_thread")


@needs_adapters
def test_the_trained_lora_maps_every_module_onto_the_zoo_model() -> None:
    parents = load_parents(paths=[paths.model_file(ZOO, "base")] * 2, dtype="fp32", device="cpu")
    lora, = load_loras([("colour", adapter_file(ZOO, "lora-colour"))], bank=parents.bank, unet_config=unet_config(parents))
    assert lora.format == "peft"
    assert {l.scale for l in lora.layers} == {1.0}  # lora_alpha = rank, read from the file's metadata
    # every attention projection of the UNet: 4 per attention, 2 attentions per transformer block
    assert len(lora.layers) == sum(1 for k in parents.bank.keys if k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")))
    assert all(l.up.abs().sum() > 0 for l in lora.layers)  # trained: up factors start at zero


@needs_adapters
def test_the_trained_hypernetwork_loads_with_the_zoo_context_widths() -> None:
    hypernetwork = load_hypernetwork(adapter_file(ZOO, "hyper-clean"))
    assert sorted(hypernetwork.dims) == [32, 64]
    assert tuple(hypernetwork.structure.layer_structure) == (1.0, 2.0, 1.0)


@needs_adapters
def test_the_colour_lora_raises_colour_accuracy_and_costs_digit_accuracy() -> None:
    """The trade-off that makes its strength worth searching, measured on held-out captions."""
    evaluator = CandidateEvaluator(zoo=ZOO, count=40, steps=12)
    lora = str(adapter_file(ZOO, "lora-colour"))
    base = evaluator.evaluate(Candidate("base", ("base",)))
    full = evaluator.evaluate(Candidate("lora", ("base",), loras=((lora, 1.0),)))
    assert full["oracle_fg"] > base["oracle_fg"] + 0.05
    assert full["oracle_digit"] < base["oracle_digit"] - 0.2


@needs_adapters
def test_zoo_check_verifies_the_adapter_hashes(tmp_path: Path) -> None:
    copy = tmp_path / "zoo"
    shutil.copytree(ZOO, copy, ignore=shutil.ignore_patterns("diffusers"))
    assert check_zoo(zoo=copy, measure=False)["hashes"] == "ok"
    target = adapter_file(copy, "hyper-clean")
    target.write_bytes(target.read_bytes() + b"\0")
    (copy / "adapters" / "stray.pt").write_bytes(b"")
    with pytest.raises(ZooError, match=r"sha256 mismatch for adapters/hyper-clean.pt.*file not in adapters.json: adapters/stray.pt"):
        check_zoo(zoo=copy, measure=False)


def test_training_the_adapters_writes_both_files_and_their_manifest(tmp_path: Path) -> None:
    copy = tmp_path / "zoo"
    copy.mkdir()
    for folder in ("config", "scorers"):
        shutil.copytree(ZOO / folder, copy / folder)
    (copy / "models").mkdir()
    shutil.copy2(paths.model_file(ZOO, "base"), paths.model_file(copy, "base"))
    manifest = train_adapters(zoo=copy, scale=0.01, measure=False, progress=False)
    assert [a["name"] for a in manifest["adapters"]] == [r.name for r in ADAPTERS]
    written = json.loads((copy / "adapters" / "adapters.json").read_text())
    assert written["adapters"] == manifest["adapters"]
    for entry in written["adapters"]:
        assert (copy / entry["file"]).is_file() and len(entry["sha256"]) == 64
    assert load_hypernetwork(adapter_file(copy, "hyper-clean")).name == "hyper-clean"


@needs_adapters
def test_the_adapters_study_file_searches_block_weights_and_adapter_strengths(tmp_path: Path) -> None:
    from optimizer.study.config import load_study_config
    from optimizer.study.runner import StudyRunner
    from optimizer.study.storage import StudyFolder

    config = load_study_config(Path(__file__).resolve().parents[1] / "studies" / "zoo-adapters.yaml")
    runner = StudyRunner(config, folder=StudyFolder(tmp_path / "run"))
    # alpha.BASE (the text encoder) is not searched: the shape specialist was fine-tuned with its
    # text encoder frozen, so BASE is identical in both parents and its alpha changes nothing
    assert sorted(runner.space.names) == sorted(
        ["alpha.IN", "alpha.M00", "alpha.OUT", "lora.colour.IN", "lora.colour.M00", "lora.colour.OUT", "hypernetwork.clean"]
    )
    assert runner.notes == ["alpha.BASE is not searched: block(s) BASE are identical in every parent, so its value cannot change the weights"]
