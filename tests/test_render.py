"""Rendering: prompt sets (validation, split), the batched deterministic renderer, grids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from optimizer.render.grid import grid_png, save_grid
from optimizer.render.prompts import PromptSet, PromptSetError, RenderJob, load_prompt_set, parse_prompt_set
from optimizer.render.renderer import NonFiniteImages, Renderer, RenderOutOfMemory
from optimizer.zoo import domain, paths
from optimizer.zoo.prompts import ZOO_PROMPTS, render_yaml, zoo_prompt_set_data

needs_zoo = pytest.mark.skipif(not (paths.default_zoo_dir() / paths.MANIFEST).is_file(), reason="studies/zoo is not built")


# ----------------------------------------------------------------------------------- prompt sets
def test_jobs_are_prompts_times_seeds_with_negative_prompts() -> None:
    ps = parse_prompt_set({"search": ["a", {"prompt": "b", "negative": "blurry"}], "held_out": ["c"], "negative": "ugly", "seeds": [5, 9]})
    assert ps.jobs("search") == [
        RenderJob("a", "ugly", 5), RenderJob("a", "ugly", 9), RenderJob("b", "blurry", 5), RenderJob("b", "blurry", 9)
    ]
    assert ps.jobs("held_out") == [RenderJob("c", "ugly", 5), RenderJob("c", "ugly", 9)]
    assert parse_prompt_set({"search": ["a"], "seeds": 3}).seeds == [0, 1, 2]


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"search": ["a"], "held_out": ["a"]}, "held_out[0]", "also a search prompt"),
        ({"search": ["a", "a"]}, "search[1]", "duplicate"),
        ({"search": []}, "search", "at least 1"),
        ({"search": ["  "]}, "search[0].prompt", "blank"),
        ({"search": ["a"], "scheduler": "k_euler_x"}, "scheduler", "unknown scheduler"),
        ({"search": ["a"], "width": 500}, "width", "multiple of 8"),
        ({"search": ["a"], "steps": 0}, "steps", "greater than or equal to 1"),
        ({"search": ["a"], "seeds": [1, 1]}, "seeds", "distinct"),
        ({"search": ["a"], "seeds": 0}, "seeds", "at least 1"),
        ({"search": ["a"], "guidance": -1}, "guidance", "greater than or equal to 0"),
        ({"search": ["a"], "cfg": 7}, "cfg", "Extra inputs"),
        ({"search": ["a"], "prompts": ["b"]}, "", "not both"),
        ({"prompts": ["a", "b"], "held_out_fraction": 1.5}, "", "held_out_fraction"),
    ],
)
def test_bad_prompt_sets_name_the_field(data: dict, field: str, message: str) -> None:
    with pytest.raises(PromptSetError) as info:
        parse_prompt_set(data, source="p.yaml")
    text = str(info.value)
    assert text.startswith("p.yaml: ") and message in text
    assert f"{field}:" in text if field else True


def test_fraction_split_is_seeded_disjoint_and_complete() -> None:
    prompts = [f"prompt {i}" for i in range(40)]
    a = parse_prompt_set({"prompts": prompts, "held_out_fraction": 0.25, "split_seed": 3})
    b = parse_prompt_set({"prompts": prompts, "held_out_fraction": 0.25, "split_seed": 3})
    c = parse_prompt_set({"prompts": prompts, "held_out_fraction": 0.25, "split_seed": 4})
    search, held = [p.prompt for p in a.search], [p.prompt for p in a.held_out]
    assert len(held) == 10 and len(search) == 30 and not set(search) & set(held)
    assert sorted(search + held) == sorted(prompts)
    assert a == b and a.held_out != c.held_out


def test_load_prompt_set_errors(tmp_path: Path) -> None:
    with pytest.raises(PromptSetError, match="no prompt set file"):
        load_prompt_set(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [unclosed\n")
    with pytest.raises(PromptSetError, match="not valid YAML"):
        load_prompt_set(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(PromptSetError, match="expected a mapping"):
        load_prompt_set(bad)


def test_committed_zoo_prompt_set_is_generated_and_held_out_from_training() -> None:
    assert ZOO_PROMPTS.read_text(encoding="utf-8") == render_yaml(zoo_prompt_set_data()), "run `python -m optimizer.zoo.prompts`"
    ps = load_prompt_set(ZOO_PROMPTS)
    assert len(ps.search) == 48 and len(ps.held_out) == 64
    held = domain.held_out_combinations()
    for item in ps.search + ps.held_out:
        words = item.prompt.split()  # "a {thickness} {slant} {fg} digit {d} on a {bg} background"
        assert (int(words[5]), words[3], words[8]) in held


# ------------------------------------------------------------------------------------- renderer
@pytest.fixture(scope="module")
def zoo_pipe():
    if not (paths.default_zoo_dir() / paths.MANIFEST).is_file():
        pytest.skip("studies/zoo is not built")
    from optimizer.zoo.build import load_zoo_pipeline

    return load_zoo_pipeline("base")


def _zoo_set(**overrides) -> PromptSet:
    data = zoo_prompt_set_data()
    data.update(search=data["search"][:5], held_out=[], steps=6, **overrides)
    return parse_prompt_set(data)


@needs_zoo
@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler_a"])
def test_same_weights_same_prompt_set_give_identical_images_on_cpu(zoo_pipe, scheduler: str) -> None:
    prompt_set = _zoo_set(scheduler=scheduler, seeds=[0, 1])
    jobs = prompt_set.jobs("search")
    first = Renderer(zoo_pipe, prompt_set=prompt_set, batch_size=4).render(jobs)
    again = Renderer(zoo_pipe, prompt_set=prompt_set, batch_size=4).render(jobs)
    assert first.shape == (10, 3, 32, 32) and first.dtype == torch.float32
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert torch.equal(first, again)
    # an image does not depend on its batch (same noise, same sampler); only float rounding may differ
    other = Renderer(zoo_pipe, prompt_set=prompt_set, batch_size=3).render(jobs)
    torch.testing.assert_close(other, first, atol=2e-3, rtol=0)
    # different seeds give different images
    assert not torch.allclose(first[0], first[1], atol=0.05)


@needs_zoo
def test_renderer_uses_the_prompt_sets_scheduler_without_touching_the_pipeline(zoo_pipe) -> None:
    before = type(zoo_pipe.scheduler)
    renderer = Renderer(zoo_pipe, prompt_set=_zoo_set(scheduler="euler_a"))
    assert type(renderer.pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert type(zoo_pipe.scheduler) is before
    assert renderer.pipe.unet is zoo_pipe.unet and renderer.pipe.text_encoder is zoo_pipe.text_encoder
    # the schedule itself stays the checkpoint's
    assert renderer.pipe.scheduler.config.beta_end == zoo_pipe.scheduler.config.beta_end
    assert renderer.size == (32, 32)
    assert renderer.batch_size == 16  # "auto" on CPU


@needs_zoo
def test_out_of_memory_halves_the_batch_and_a_single_image_that_does_not_fit_fails(zoo_pipe, monkeypatch) -> None:
    prompt_set = _zoo_set(seeds=[0, 1])
    jobs = prompt_set.jobs("search")
    renderer = Renderer(zoo_pipe, prompt_set=prompt_set, batch_size=8)
    expected = renderer.render(jobs)
    calls: list[int] = []
    real_call = renderer._call

    def limited(chunk):
        calls.append(len(chunk))
        if len(chunk) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(chunk)

    monkeypatch.setattr(renderer, "_call", limited)
    images = renderer.render(jobs)
    assert calls[:3] == [8, 4, 2] and max(calls[3:]) <= 2
    assert renderer.batch_size == 2
    torch.testing.assert_close(images, expected, atol=2e-3, rtol=0)

    def nothing_fits(chunk):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(renderer, "_call", nothing_fits)
    with pytest.raises(RenderOutOfMemory, match="one 32x32 image does not fit"):
        renderer.render(jobs)

    def other_error(chunk):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(renderer, "_call", other_error)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        renderer.render(jobs)


@needs_zoo
def test_nan_images_fail_with_the_prompts_named(zoo_pipe, monkeypatch) -> None:
    prompt_set = _zoo_set()
    renderer = Renderer(zoo_pipe, prompt_set=prompt_set, batch_size=5)

    def broken(chunk):
        images = torch.rand(len(chunk), 3, 32, 32)
        images[2, 0, 4, 4] = float("nan")
        return images

    monkeypatch.setattr(renderer, "_call", broken)
    with pytest.raises(NonFiniteImages, match=r"1 of 5 images have NaN/inf pixels: .*seed 0"):
        renderer.render(prompt_set.jobs("search"))


@needs_zoo
def test_batches_stream_in_job_order(zoo_pipe) -> None:
    prompt_set = _zoo_set()
    jobs = prompt_set.jobs("search")
    batches = list(Renderer(zoo_pipe, prompt_set=prompt_set, batch_size=2).batches(jobs))
    assert [b.start for b in batches] == [0, 2, 4] and [len(b.images) for b in batches] == [2, 2, 1]
    assert [j for b in batches for j in b.jobs] == jobs and all(b.seconds > 0 for b in batches)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_batch_size_is_measured_on_cuda() -> None:
    from optimizer.zoo.build import load_zoo_pipeline

    pipe = load_zoo_pipeline("base").to("cuda")
    prompt_set = _zoo_set(seeds=list(range(8)))
    renderer = Renderer(pipe, prompt_set=prompt_set, max_batch_size=16)
    images = renderer.render(prompt_set.jobs("search"))
    assert renderer.bytes_per_image and renderer.bytes_per_image > 0 and renderer.batch_size == 16
    cpu = Renderer(load_zoo_pipeline("base"), prompt_set=prompt_set, batch_size=8).render(prompt_set.jobs("search"))
    torch.testing.assert_close(images.cpu(), cpu, atol=2e-2, rtol=0)


# ----------------------------------------------------------------------------------------- grids
def test_save_grid_writes_a_png_atomically_with_labels(tmp_path: Path) -> None:
    images = torch.rand(5, 3, 32, 48)
    path = save_grid(images, tmp_path / "grids" / "g.png", nrow=3, labels=[f"caption number {i} that is long" for i in range(5)])
    with Image.open(path) as picture:
        assert picture.size == (2 + 3 * (48 + 2), 2 + 2 * (32 + 12 + 2))
        assert picture.mode == "RGB"
        top_left = torch.tensor(list(picture.crop((2, 2, 50, 34)).getdata()), dtype=torch.float32).view(32, 48, 3) / 255
    torch.testing.assert_close(top_left.permute(2, 0, 1), images[0], atol=1 / 255 + 1e-6, rtol=0)
    assert [p.name for p in path.parent.iterdir()] == ["g.png"]
    plain = grid_png(images)
    assert plain.startswith(b"\x89PNG")


def test_grid_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PNG"):
        save_grid(torch.rand(1, 3, 8, 8), tmp_path / "g.jpg")
    with pytest.raises(ValueError, match="2 labels for 1 images"):
        grid_png(torch.rand(1, 3, 8, 8), labels=["a", "b"])
    with pytest.raises(ValueError, match="expected images"):
        grid_png(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="no images"):
        grid_png(torch.rand(0, 3, 8, 8))
    assert not (tmp_path / "g.jpg").exists()


@needs_zoo
def test_renderer_keeps_a_half_precision_pipeline_half(zoo_pipe) -> None:
    # diffusers' from_pipe would cast the shared UNet to float32 in place; the renderer must not
    from optimizer.zoo.build import load_zoo_pipeline

    half = load_zoo_pipeline("base", dtype=torch.float16)
    weight = half.unet.conv_in.weight
    renderer = Renderer(half, prompt_set=_zoo_set(scheduler="euler"))
    assert renderer.pipe.unet is half.unet and half.unet.dtype == torch.float16
    assert half.unet.conv_in.weight is weight
