"""The scorer registry: every registered scorer built from tiny random configs of its real
architecture and run through the objective contract; the learned scorers checked against their
reference implementations' math; plug-ins; the sanity gate and the normalised combination."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from objectives.base import MeanScore, ObjectiveError
from objectives.build import build_objectives, objective_spec
from objectives.calibration import CalibrationScores, calibrate, gate_failures, shuffled_captions
from objectives.combine import combine_scores
from objectives.registry import ScorerSettings, get_scorer, register_scorer, scorers
from optimizer.cli import app
from optimizer.study.config import StudyConfigError, parse_study_config
from optimizer.zoo import paths
from tests import tiny_scorers as tiny
from tests.zoo_clip import ZOO_CLIP
from tests.zoo_study import needs_zoo, zoo_study_data

runner = CliRunner()


def _reference_images(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _zoo_head(path: Path) -> Path:
    from objectives.clip_score import load_open_clip

    dim = int(load_open_clip("evomerge-digits-clip", pretrained=str(paths.clip_file(paths.default_zoo_dir())))[0].encode_image(torch.rand(1, 3, 32, 32)).shape[1])
    torch.manual_seed(0)
    torch.save({"weight": torch.randn(1, dim), "bias": torch.zeros(1)}, path)
    return path


#: how the contract test builds each registered scorer (a new scorer without an entry fails the contract test)
BUILDERS = {
    "clip": lambda tmp: ZOO_CLIP,
    "aesthetic": lambda tmp: {**ZOO_CLIP, "aesthetic_head": str(_zoo_head(tmp / "head.pth"))},
    "fid": lambda tmp: {**ZOO_CLIP, "features": "clip", "reference": str(_reference_images(tmp / "ref"))},
    "kid": lambda tmp: {**ZOO_CLIP, "features": "clip", "reference": str(_reference_images(tmp / "ref"))},
    "pickscore": lambda tmp: {"pickscore_model": str(tiny.write_pickscore(tmp / "pickscore"))},
    "hps": lambda tmp: {"hps_checkpoint": str(tiny.write_hps_checkpoint(tmp / "hps.pt")), "hps_model": tiny.register_tiny_hps()},
    "imagereward": lambda tmp: tiny.write_imagereward(tmp / "imagereward"),
    "aesthetic_v25": lambda tmp: {"siglip_model": str(tiny.write_siglip(tmp / "siglip")), "aesthetic_v25_head": str(tiny.write_v25_head(tmp / "v25.pth"))},
}


# ------------------------------------------------------------------------------ the registry contract
@pytest.mark.parametrize("name", sorted(scorers()))
def test_every_registered_scorer_keeps_the_contract(name: str, tmp_path: Path) -> None:
    assert name in BUILDERS, f"scorer {name!r} has no tiny builder in tests/test_scorers.py::BUILDERS"
    cls = get_scorer(name)
    assert cls.name == name and isinstance(cls.higher_is_better, bool) and cls.weights and (cls.__doc__ or "").strip()
    assert issubclass(cls.Settings, ScorerSettings)
    with pytest.raises(ValueError, match=f"{name} has no option 'no_such_option'"):
        objective_spec(name, options={**BUILDERS[name](tmp_path), "no_such_option": 1})
    required = [f for f, info in cls.Settings.model_fields.items() if info.is_required()]
    if required:
        with pytest.raises(ValueError, match=f"scorers.{required[0]}: objective {name} needs {required[0]}"):
            objective_spec(name, options={})
    spec = objective_spec(name, options=BUILDERS[name](tmp_path))
    assert spec.direction == ("maximize" if cls.higher_is_better else "minimize")
    (objective,) = build_objectives([spec])
    assert objective.name == name and objective.direction == spec.direction
    torch.manual_seed(0)
    images, prompts = torch.rand(4, 3, 32, 32), ["a red 3", "a blue 7", "a green 1", "a red 8"]
    objective.reset()
    objective.update(images[:2], prompts=prompts[:2])
    objective.update(images[2:], prompts=prompts[2:])
    value = objective.compute()
    assert math.isfinite(value)
    objective.reset()
    objective.update(images, prompts=prompts)
    assert objective.compute() == pytest.approx(value, rel=1e-4, abs=1e-6)  # batching does not change the value
    if cls.per_image:
        objective.reset()
        objective.update(images[:1], prompts=prompts[:1])
        first = objective.compute()
        objective.reset()
        objective.update(images[1:2], prompts=prompts[1:2])
        second = objective.compute()
        objective.reset()
        objective.update(images[:2], prompts=prompts[:2])
        assert objective.compute() == pytest.approx((first + second) / 2, rel=1e-4, abs=1e-6)  # a mean of per-image scores


# ------------------------------------------------------------------------------ reference math
def _pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in images]


def _quantised(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round() / 255


def test_pickscore_matches_the_reference_inference(tmp_path: Path) -> None:
    """PickScore's README: processor(images) / processor(text), unit-norm features, exp(logit_scale) * text @ image.T."""
    from transformers import AutoProcessor, CLIPModel

    folder = tiny.write_pickscore(tmp_path / "ps")
    (objective,) = build_objectives([objective_spec("pickscore", options={"pickscore_model": str(folder)})])
    model, processor = CLIPModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    torch.manual_seed(1)
    prompts = ["a red cat on a mat", "two blue dogs"]
    for shape in ((2, 3, 32, 32), (2, 3, 48, 40)):  # at the model's size; resized and cropped
        images = _quantised(torch.rand(shape))
        ours = objective.scores(images, prompts)
        expected = []
        with torch.no_grad():
            for image, prompt in zip(_pil(images), prompts, strict=True):
                image_inputs = processor(images=[image], return_tensors="pt")
                text_inputs = processor(text=[prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
                image_embs = model.get_image_features(**image_inputs).pooler_output
                text_embs = model.get_text_features(**text_inputs).pooler_output
                image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
                text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
                expected.append(float(model.logit_scale.exp() * (text_embs @ image_embs.T)[0, 0]))
        tol = 1e-4 if shape[-1] == 32 else 0.05  # PIL's bicubic against torch's antialiased bicubic
        assert ours.tolist() == pytest.approx(expected, abs=tol * max(1.0, max(abs(e) for e in expected)))
    assert float(model.logit_scale.exp().detach()) == pytest.approx(100.0, rel=1e-3)


def test_hps_is_the_cosine_of_open_clip_features_after_resize_max_pad(tmp_path: Path) -> None:
    """HPSv2's img_score: model(image, text) with output_dict, image_features @ text_features.T; preprocess_val = ResizeMaxSize + Normalize."""
    import open_clip
    import torchvision.transforms.functional as TF

    ckpt = tiny.write_hps_checkpoint(tmp_path / "hps.pt", seed=3)
    (objective,) = build_objectives([objective_spec("hps", options={"hps_checkpoint": str(ckpt), "hps_model": tiny.register_tiny_hps()})])
    model = open_clip.create_model(tiny.TINY_HPS_MODEL, pretrained=None, output_dict=True)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(tiny.TINY_HPS_MODEL)
    torch.manual_seed(2)
    images, prompts = torch.rand(2, 3, 64, 48), ["a photo of a cat", "an oil painting"]
    ours = objective.scores(images, prompts)
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            h, w = image.shape[1:]
            scale = 32 / max(h, w)
            new = tuple(round(d * scale) for d in (h, w))
            x = TF.resize(image, list(new), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            pad_h, pad_w = 32 - new[0], 32 - new[1]
            x = TF.pad(x, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
            x = TF.normalize(x, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
            out = model(x[None], tokenizer([prompt]))
            expected.append(float(torch.diagonal(out["image_features"] @ out["text_features"].T)[0]))
    assert ours.tolist() == pytest.approx(expected, abs=2e-3)


def test_aesthetic_v25_matches_the_reference_package(tmp_path: Path) -> None:
    from aesthetic_predictor_v2_5 import convert_v2_5_from_siglip

    folder, head = tiny.write_siglip(tmp_path / "siglip", seed=4), tiny.write_v25_head(tmp_path / "v25.pth", seed=5)
    (objective,) = build_objectives([objective_spec("aesthetic_v25", options={"siglip_model": str(folder), "aesthetic_v25_head": str(head)})])
    model, processor = convert_v2_5_from_siglip(predictor_name_or_path=str(head), encoder_model_name=str(folder))
    torch.manual_seed(3)
    for shape in ((3, 3, 32, 32), (2, 3, 40, 56)):
        images = _quantised(torch.rand(shape))
        with torch.no_grad():
            expected = model(**processor(images=_pil(images), return_tensors="pt")).logits.squeeze(-1)
        tol = 1e-4 if shape[-1] == 32 else 0.02
        assert objective.scores(images).tolist() == pytest.approx(expected.tolist(), abs=tol)


def test_imagereward_matches_the_image_reward_package(tmp_path: Path) -> None:
    """The real image-reward 1.5 (ImageReward.score on PIL images, run by
    tests/reference/make_imagereward_reference.py in a transformers-4 side environment) on the same
    seeded tiny BLIP, prompts and images: tokens, cross-attention, reward MLP and standardisation."""
    from tests.reference import imagereward_inputs as inputs

    reference = json.loads(inputs.REFERENCE_FILE.read_text(encoding="utf-8"))
    assert reference["versions"]["image-reward"] == "1.5"
    options = tiny.write_imagereward(tmp_path / "ir")
    (objective,) = build_objectives([objective_spec("imagereward", options=options)])
    assert objective.tokenizer(inputs.PROMPTS, padding="max_length", truncation=True, max_length=35)["input_ids"] == reference["input_ids"]
    assert (objective.tokenizer.bos_token, len(objective.tokenizer)) == (reference["special_tokens"]["bos_token"], reference["special_tokens"]["vocab_size"])
    expected = np.asarray(reference["scores"])  # [prompt, image]
    assert np.ptp(expected) > 0.5  # the check can tell images and prompts apart
    for index, (h, w, _) in enumerate(inputs.IMAGES):
        image = torch.from_numpy(inputs.image(index)).permute(2, 0, 1)[None].float() / 255
        ours = objective.scores(image.expand(len(inputs.PROMPTS), -1, -1, -1), inputs.PROMPTS).numpy()
        tol = 1e-4 if (h, w) == (48, 48) else 0.01  # at the input size; PIL's bicubic against torch's antialiased bicubic
        np.testing.assert_allclose(ours, expected[:, index], atol=tol)


def test_imagereward_refuses_files_that_do_not_fit(tmp_path: Path) -> None:
    options = tiny.write_imagereward(tmp_path / "ir")
    state = torch.load(options["imagereward_checkpoint"], weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("mlp.")}, tmp_path / "nohead.pt")
    with pytest.raises(ObjectiveError, match="no reward head"):
        build_objectives([objective_spec("imagereward", options={**options, "imagereward_checkpoint": str(tmp_path / "nohead.pt")})])
    med = json.loads(Path(options["imagereward_med_config"]).read_text())
    (tmp_path / "med.json").write_text(json.dumps({**med, "num_hidden_layers": 3}))
    with pytest.raises(ObjectiveError, match="does not fit the BLIP text encoder"):
        build_objectives([objective_spec("imagereward", options={**options, "imagereward_med_config": str(tmp_path / "med.json")})])


def test_missing_weights_name_the_file_and_where_to_get_it(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "p.txt").write_text("a cat\n")
    cases = [
        (["--objective", "pickscore", "--option", f"pickscore_model={tmp_path / 'nope'}"], "huggingface.co/yuvalkirstain/PickScore_v1"),
        (["--objective", "hps", "--option", f"hps_checkpoint={tmp_path / 'HPS_v2.1_compressed.pt'}"], "HPS_v2.1_compressed.pt"),
        (["--objective", "aesthetic_v25", "--option", f"siglip_model={tmp_path}", "--option", f"aesthetic_v25_head={tmp_path / 'h.pth'}"], "config.json"),
        (["--objective", "imagereward", "--option", f"imagereward_checkpoint={tmp_path / 'p.txt'}", "--option", f"imagereward_med_config={tmp_path / 'p.txt'}",
          "--option", f"imagereward_tokenizer={tmp_path}"], "vocab.txt (download bert-base-uncased from https://huggingface.co/google-bert/bert-base-uncased)"),
        (["--objective", "imagereward", "--option", f"imagereward_checkpoint={tmp_path / 'ImageReward.pt'}", "--option", f"imagereward_med_config={tmp_path / 'm.json'}",
          "--option", f"imagereward_tokenizer={tmp_path}"], "no ImageReward.pt at"),
        (["--objective", "pickscore"], "needs --option pickscore_model=VALUE"),
        (["--objective", "clip", "--option", "hps_model=x"], "--option hps_model: none of clip takes it"),
        (["--objective", "nosuch"], "unknown objective 'nosuch'"),
        (["--objective", "tests.nosuch:Scorer"], "cannot import tests.nosuch"),
    ]
    for args, needle in cases:
        result = runner.invoke(app, ["score", "--images", str(tmp_path / "imgs"), "--prompts", str(tmp_path / "p.txt"), *args])
        assert result.exit_code == 2 and needle in result.output and len(result.output.strip().splitlines()) == 1, (args, result.output)


# ------------------------------------------------------------------------------ plug-ins
class NoiseLover(MeanScore):
    """A lying scorer for the tests: the mean absolute horizontal gradient (uniform noise scores highest)."""

    name = "noise_lover"
    higher_is_better = True
    uses_prompts = False
    Settings = ScorerSettings
    weights = "none"
    direction = "maximize"

    @classmethod
    def from_settings(cls, settings, *, context):
        return cls()

    gain = 1.0

    def update(self, images, *, prompts=()):
        self.add(self.gain * (images[..., 1:] - images[..., :-1]).abs().flatten(1).mean(dim=1))


class Sharpness(NoiseLover):
    """A plug-in with an option: the mean absolute horizontal gradient, times ``gain``."""

    name = "sharpness"

    class Settings(ScorerSettings):
        gain: float = 1.0

    @classmethod
    def from_settings(cls, settings, *, context):
        objective = cls()
        objective.gain = settings.gain
        return objective


def test_a_plug_in_scorer_by_module_and_class(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.tile(np.array([0, 255], dtype=np.uint8), (32, 16))[..., None].repeat(3, 2)).save(tmp_path / "imgs" / "a.png")
    result = runner.invoke(app, ["score", "--images", str(tmp_path / "imgs"), "--objective", "tests.test_scorers:Sharpness",
                                 "--option", "sharpness.gain=2", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["objective"] == "sharpness" and row["value"] == pytest.approx(2.0, abs=1e-3)
    assert get_scorer("tests.test_scorers:Sharpness") is Sharpness
    not_scorer = runner.invoke(app, ["score", "--images", str(tmp_path / "imgs"), "--objective", "tests.test_scorers:_pil"])
    assert not_scorer.exit_code == 2 and "is not a class" in not_scorer.output


def test_an_installed_plug_in_is_found_through_its_entry_point(tmp_path: Path, monkeypatch) -> None:
    import objectives.registry as registry

    dist = tmp_path / "evomerge_sharp-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evomerge-sharp\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[evomerge.scorers]\nsharpness = tests.test_scorers:Sharpness\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_discovered", False)
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    assert scorers()["sharpness"] is Sharpness
    config = parse_study_config({**zoo_study_data(tmp_path), "objectives": [{"name": "sharpness", "options": {"gain": 3}}]}, base=tmp_path)
    assert config.objective_specs[0].settings.gain == 3


def test_register_scorer_refuses_a_name_taken_by_another_class() -> None:
    class Clip(NoiseLover):
        """Not the CLIP score."""

        name = "clip"

    with pytest.raises(ValueError, match="registered twice"):
        register_scorer(Clip)


# ------------------------------------------------------------------------------ sanity gate and combination
def test_shuffled_captions_give_every_image_another_caption() -> None:
    prompts = ["a", "b", "a", "c", "b"]
    wrong = shuffled_captions(prompts)
    assert all(w != p for w, p in zip(wrong, prompts, strict=True)) and sorted(set(wrong)) == ["a", "b", "c"]
    assert shuffled_captions(["x", "x"]) == ["x", "x"]


def test_the_gate_catches_a_scorer_that_prefers_noise() -> None:

    images = torch.zeros(4, 3, 32, 32)
    images[:, :, 8:24, 12:20] = 1.0  # clean glyph-like renders
    liar, honest = NoiseLover(), Sharpness()
    honest.gain = -1.0  # prefers smooth images: real renders beat noise, flat beats real
    scores = calibrate([liar, honest], images=images, prompts=["a", "b", "c", "d"], seed=0)
    failures = gate_failures(scores)
    assert len(failures) == 2 and "noise_lover does not rank the parents' renders" in failures[0] and "noise" in failures[0]
    assert "flat" in failures[1] and "noise" not in failures[1].split("above")[1]
    assert scores[0].shuffled is None  # a scorer that reads no prompts is not given shuffled captions
    again = CalibrationScores.from_dict(json.loads(json.dumps(scores[0].as_dict())))
    assert again == scores[0]


def test_combined_means_follow_their_formulas() -> None:
    anchors = [{"noise": 10.0, "parents": 30.0}, {"noise": 200.0, "parents": 100.0}]  # a maximized and a minimized objective
    values, weights, directions = [40.0, 150.0], [1.0, 3.0], ["maximize", "minimize"]
    n = [1.5, 0.5]  # (40-10)/(30-10); (150-200)/(100-200)
    kw = {"weights": weights, "directions": directions, "anchors": anchors}
    assert combine_scores(values, mean="sum", **kw) == pytest.approx(1 * n[0] + 3 * n[1])
    assert combine_scores(values, mean="arithmetic", **kw) == pytest.approx((1.5 + 1.5) / 4)
    assert combine_scores(values, mean="geometric", **kw) == pytest.approx(math.exp((math.log(1.5) + 3 * math.log(0.5)) / 4))
    assert combine_scores(values, mean="quadratic", **kw) == pytest.approx(math.sqrt((1.5**2 + 3 * 0.25) / 4))
    assert combine_scores([30.0, 100.0], mean="arithmetic", **kw) == pytest.approx(1.0)  # the parents score 1
    assert combine_scores([10.0, 200.0], mean="arithmetic", **kw) == pytest.approx(0.0)  # noise scores 0
    assert combine_scores(values, weights=weights, directions=directions, mean="sum") == pytest.approx(40 - 3 * 150)  # raw: the old weighted sum
    with pytest.raises(ValueError, match="needs normalised scores"):
        combine_scores(values, weights=weights, directions=directions, mean="geometric")
    with pytest.raises(ObjectiveError, match="cannot normalise"):
        combine_scores(values, mean="arithmetic", weights=weights, directions=directions, anchors=[anchors[0], {"noise": 1.0, "parents": 1.0}])


def test_study_file_combination_rules(tmp_path: Path) -> None:
    base = zoo_study_data(tmp_path)
    two = [{"name": "clip"}, {"name": "tests.test_scorers:Sharpness"}]
    config = parse_study_config({**base, "objectives": two}, base=tmp_path)
    assert (config.normalisation, config.combined_mean) == ("calibration", "arithmetic")
    assert (parse_study_config(base, base=tmp_path).normalisation, parse_study_config(base, base=tmp_path).combined_mean) == ("none", "sum")
    for combine, needle in [({"normalise": "none", "mean": "geometric"}, "combine.mean: geometric means need normalised scores"),
                            ({"mean": "arithmetic"}, None)]:
        data = {**base, "objectives": two, "combine": combine}
        if needle is None:
            parse_study_config(data, base=tmp_path)
        else:
            with pytest.raises(StudyConfigError, match=needle):
                parse_study_config(data, base=tmp_path)
    with pytest.raises(StudyConfigError, match="positive weights"):
        parse_study_config({**base, "objectives": [{"name": "clip", "weight": -1}, two[1]]}, base=tmp_path)
    with pytest.raises(StudyConfigError, match="scorers.no_such: no scorer takes"):
        parse_study_config({**base, "scorers": {"no_such": 1}}, base=tmp_path)
    with pytest.raises(StudyConfigError, match=r"objectives\[0\] \(clip\): options.reference: clip has no option"):
        parse_study_config({**base, "objectives": [{"name": "clip", "options": {"reference": "x"}}]}, base=tmp_path)
    rel = parse_study_config({**base, "objectives": [{"name": "pickscore", "options": {"pickscore_model": "models/ps"}}]}, base=tmp_path)
    assert rel.objective_specs[0].settings.pickscore_model == str(tmp_path / "models" / "ps")  # paths are relative to the study file


@needs_zoo
def test_a_study_whose_scorer_prefers_noise_stops_at_the_gate(tmp_path: Path) -> None:
    data = zoo_study_data(tmp_path, objectives=["tests.test_scorers:NoiseLover"], calibration={"prompts": 2})
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    result = runner.invoke(app, ["study", "run", str(study), "--out", str(out), "--no-progress"])
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert "sanity gate: noise_lover does not rank the parents' renders" in line and "calibration.gate: false" in line
    assert not out.exists()  # nothing left behind
    study.write_text(yaml.safe_dump({**data, "calibration": {"prompts": 2, "gate": False}, "budget": {"trials": 1}}))
    result = runner.invoke(app, ["study", "run", str(study), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "note: calibration:" not in result.output  # no gate and nothing to normalise: no calibration renders



class InterruptedScorer(NoiseLover):
    """Ctrl-C arriving while the calibration set is scored."""

    name = "interrupted"

    def update(self, images, *, prompts=()):
        raise KeyboardInterrupt


def test_ctrl_c_during_calibration_leaves_no_study_in_external_storage(tmp_path: Path) -> None:
    import optuna

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    data = zoo_study_data(tmp_path, objectives=["tests.test_scorers:InterruptedScorer"], calibration={"prompts": 2}, storage=url)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    result = runner.invoke(app, ["study", "run", str(study), "--out", str(out), "--no-progress"])
    assert result.exit_code == 130 and result.output.strip().splitlines()[-1] == "interrupted", result.output
    assert not out.exists()
    assert optuna.get_all_study_names(storage=url) == []  # the study made for this run went with it

@needs_zoo
def test_a_two_objective_study_scores_normalised_values_and_reports_its_calibration(tmp_path: Path) -> None:
    import optuna

    data = zoo_study_data(tmp_path, objectives=["clip", {"name": "tests.test_scorers:Sharpness", "options": {"gain": -1}}],
                       calibration={"prompts": 2, "gate": False}, budget={"trials": 2})
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    result = runner.invoke(app, ["study", "run", str(study), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    loaded = optuna.load_study(study_name="test-study", storage=f"sqlite:///{out / 'study.db'}")
    calibration = {c["name"]: c for c in loaded.user_attrs["calibration"]}
    assert loaded.user_attrs["combine"] == {"normalise": "calibration", "mean": "arithmetic"}
    for trial in loaded.trials:
        v = trial.user_attrs["values"]
        n = [(v[k] - calibration[k]["noise"]) / (calibration[k]["parents"] - calibration[k]["noise"]) for k in ("clip", "sharpness")]
        assert trial.value == pytest.approx(sum(n) / 2, rel=1e-6)
    report = (out / "report" / "calibration.md").read_text()
    assert "| clip | maximize |" in report and "normalise **calibration**, mean **arithmetic**" in report
