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
    result = runner.invoke(app, ["score", *map(str, args)])
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
