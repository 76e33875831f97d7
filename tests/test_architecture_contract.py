"""Every shipped architecture record through the same checks, on a tiny model of it built with
diffusers' own classes (tests/tiny_archs.py): a new record is tested without editing this file
(and fails naming it until it has a tiny model).

* the record's identify rules find it from the model's keys, and every key has exactly one owner;
* every block of the MBW order owns keys (a variant may leave one empty: Flux schnell's guidance_in);
* MBW strings round-trip through the record's block order;
* the merge identities hold on it: alpha 0 gives parent 0, alpha 1 gives parent 1 on every block
  (the VAE and other components stay parent 0's), and a 50/50 merge is the mean;
* the canonical keys convert to the diffusers modules and back unchanged.
"""

from __future__ import annotations

import random

import pytest
import torch

from optimizer.architectures.detect import detect_architecture
from optimizer.architectures.layout import available_layouts, load_layout
from optimizer.architectures.mbw import parse_mbw
from optimizer.merge import NON_MERGEABLE_PATTERNS, MergeRecipe, merge_state_dicts_reference
from tests.tiny_archs import TINY, tiny_state_dict

ARCHITECTURES = available_layouts()


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny(request) -> dict:
    return {"name": request.param, "dicts": [tiny_state_dict(request.param, seed) for seed in (0, 1)]}


def test_the_record_identifies_its_model_and_owns_every_key_once(tiny: dict) -> None:
    layout = load_layout(tiny["name"])
    assert detect_architecture(tiny["dicts"][0], source="tiny").name == layout.name
    owners = layout.assign(tiny["dicts"][0]).owner
    used = set(owners.values())
    empty = [b for b in layout.blocks if b not in used]
    assert len(empty) <= 1, f"{layout.name}: blocks owning no key: {empty}"


def test_mbw_strings_round_trip_through_the_block_order(tiny: dict) -> None:
    layout = load_layout(tiny["name"])
    rng = random.Random(len(layout.blocks))
    values = {b: round(rng.uniform(0, 1), 4) for b in layout.blocks}
    recipe = MergeRecipe(method="weighted_sum", params={"alpha": values}, seed=0)
    assert parse_mbw(recipe.to_mbw(layout=layout), layout=layout) == values


def test_merge_identities_hold(tiny: dict) -> None:
    layout = load_layout(tiny["name"])
    a, b = tiny["dicts"]

    def merged(alpha: float) -> dict[str, torch.Tensor]:
        recipe = MergeRecipe.uniform(method="weighted_sum", layout=layout, alpha=alpha)
        return merge_state_dicts_reference(state_dicts=[a, b], layout=layout, recipe=recipe)

    zero, one, half = merged(0.0), merged(1.0), merged(0.5)
    for key in a:
        owner = layout.owner_of(key)
        copied = owner in layout.components or any(p.search(key) for p in NON_MERGEABLE_PATTERNS) or not a[key].is_floating_point()
        assert torch.equal(zero[key], a[key]), key
        assert torch.equal(one[key], a[key] if copied else b[key]), key
        if not copied:
            torch.testing.assert_close(half[key], (a[key] + b[key]) / 2, msg=lambda m, k=key: f"{k}: {m}")


def test_canonical_keys_convert_to_diffusers_modules_and_back(tiny: dict) -> None:
    from optimizer.checkpoint.convert import from_diffusers, to_diffusers
    from optimizer.testing.tiny_dit import tiny_dit_config_dir
    from optimizer.testing.tiny_models import tiny_config_dir

    layout = load_layout(tiny["name"])
    state = tiny["dicts"][0]
    kind, name = TINY[layout.name]
    if kind == "sd":
        from optimizer.testing import tiny_models

        build = {"sd1": tiny_models.tiny_sd1_components, "sd2": tiny_models.tiny_sd2_components, "sdxl": tiny_models.tiny_sdxl_components}[name]
        config_dir = tiny_config_dir(build(0), name)
    else:
        from optimizer.testing.tiny_dit import tiny_dit_components

        config_dir = tiny_dit_config_dir(tiny_dit_components(name, 0), name)
    import json
    from pathlib import Path

    converted = to_diffusers(state_dict=state, layout=layout, config_dir=config_dir)
    configs = {name: json.loads((Path(config_dir) / name / "config.json").read_text()) for name in converted.modules
               if (Path(config_dir) / name / "config.json").is_file()}
    back = from_diffusers(modules=converted.modules, layout=layout, configs=configs)
    kept = {k for k in state if not any(p.search(k) for p in NON_MERGEABLE_PATTERNS)}
    assert kept <= set(back), sorted(kept - set(back))[:5]
    for key in kept:
        assert torch.equal(back[key], state[key]), key
