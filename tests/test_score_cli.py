"""`evomerge score` on folders of images: the zoo CLIP on real renders, aesthetic heads, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torchvision.utils import save_image
from typer.testing import CliRunner

from optimizer.cli import app
from optimizer.zoo import domain, paths

runner = CliRunner()
ZOO = paths.default_zoo_dir()
needs_zoo = pytest.mark.skipif(not paths.clip_file(ZOO).is_file(), reason="studies/zoo is not built (evomerge zoo build)")
HEADS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "aesthetic" / "laion-aesthetic-predictor"


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("renders")
    items = domain.samples(images="test", captions="held_out", count=40, seed=5)
    images = domain.render([s.index for s in items], [s.attributes for s in items])
    for i, image in enumerate(images):
        save_image(image, str(folder / f"{i:03d}.png"))
    right = folder.parent / "right.txt"
    right.write_text("\n".join(s.caption for s in items) + "\n")
    wrong = folder.parent / "wrong.json"
    wrong.write_text(json.dumps({f"{i:03d}.png": items[(i + 1) % len(items)].caption for i in range(len(items))}))
    return {"images": folder, "right": right, "wrong": wrong}


def _score(*args) -> tuple[int, str]:
    """``evomerge score`` with the zoo CLIP (the runtime's default is ViT-L-14, which tests cannot download)."""
    zoo_clip = ["--clip-model", "evomerge-digits-clip", "--clip-weights", str(paths.clip_file(ZOO))]
    result = runner.invoke(app, ["score", *map(str, args), *zoo_clip])
    return result.exit_code, result.output


@needs_zoo
def test_clip_score_of_a_folder_prefers_the_right_prompts(renders) -> None:
    code, out = _score("--images", renders["images"], "--objective", "clip", "--prompts", renders["right"], "--json")
    assert code == 0, out
    right = json.loads(out)[0]
    assert right["objective"] == "clip" and right["direction"] == "maximize" and right["images"] == 40
    code, out = _score("--images", renders["images"], "--objective", "clip", "--prompts", renders["wrong"], "--json")
    assert code == 0, out
    assert json.loads(out)[0]["value"] < right["value"] - 10
    code, table = _score("--images", renders["images"], "--objective", "clip", "--prompts", renders["right"])
    assert code == 0 and "clip" in table and "maximize" in table


def test_score_errors_name_what_is_missing(renders, tmp_path: Path) -> None:
    code, out = _score("--images", renders["images"], "--objective", "fid")
    assert code == 2 and "needs --reference" in out
    code, out = _score("--images", renders["images"], "--objective", "nonsense")
    assert code == 2 and "unknown objective 'nonsense'" in out
    code, out = _score("--images", tmp_path, "--objective", "clip", "--prompts", renders["right"])
    assert code == 2 and "holds no images" in out
    short = tmp_path / "short.txt"
    short.write_text("one prompt\n")
    code, out = _score("--images", renders["images"], "--objective", "clip", "--prompts", short)
    assert code == 2 and "1 prompt line(s) for 40 image(s)" in out
    code, out = _score("--images", renders["images"], "--objective", "aesthetic")
    assert code == 2 and "needs --aesthetic-head" in out


@pytest.mark.skipif(not HEADS.is_dir(), reason="../shared/assets/aesthetic is absent (real LAION heads)")
def test_aesthetic_head_width_mismatch_is_reported(renders) -> None:
    # the zoo CLIP gives 64-d embeddings; LAION's ViT-L/14 head takes 768-d ones
    code, out = _score("--images", renders["images"], "--objective", "aesthetic", "--aesthetic-head", HEADS / "sa_0_4_vit_l_14_linear.pth")
    assert code == 2 and "768-d CLIP embeddings, the CLIP model gives 64-d" in out


@needs_zoo
def test_fid_and_kid_with_the_zoo_clip_features(renders, tmp_path: Path) -> None:
    import torch

    noise = tmp_path / "noise"
    noise.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(40):
        save_image(torch.rand(3, 32, 32, generator=generator), str(noise / f"{i:03d}.png"))
    same = _score("--images", renders["images"], "--objective", "fid", "--objective", "kid", "--reference", renders["images"], "--features", "clip", "--json")
    assert same[0] == 0, same[1]
    fid_same, kid_same = (row["value"] for row in json.loads(same[1]))
    code, out = _score("--images", noise, "--objective", "fid", "--objective", "kid", "--reference", renders["images"], "--features", "clip", "--json")
    assert code == 0, out
    fid_noise, kid_noise = (row["value"] for row in json.loads(out))
    assert abs(fid_same) < 1e-3 and fid_noise > 100 * max(abs(fid_same), 1e-3)
    # unit-norm 64-d features keep KID small in absolute terms; the ordering is what matters
    assert kid_noise > 10 * abs(kid_same) and kid_noise > 0.01


def test_feature_options_are_checked(renders, tmp_path: Path) -> None:
    code, out = _score("--images", renders["images"], "--objective", "fid", "--reference", renders["images"], "--features", "dino")
    assert code == 2 and "features: Input should be 'inception' or 'clip'" in out
    code, out = _score("--images", renders["images"], "--objective", "fid", "--reference", renders["images"], "--inception-weights", tmp_path / "none.pt")
    assert code == 2 and "no Inception weights file" in out
