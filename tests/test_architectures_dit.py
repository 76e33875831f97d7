"""SD3 / SD3.5 and Flux.1 end to end, checked against outside truth.

* key names: tiny models (real block counts, tiny widths) have exactly the keys of sd-mecha's
  published model configs (``flux-flux.yaml``, ``sd3-comfyui.yaml``);
* the shipped Flux config builds a model whose keys and shapes are sd-mecha's;
* the records' key rules agree with diffusers' own single-file converters, at the real widths;
* every file format (canonical single file, bare transformer file, ComfyUI-style alias prefixes,
  diffusers folder) loads to the same canonical weights; variants and foreign keys are refused;
* every merge method runs on a Flux bank and equals the reference merge;
* studies (two trials) run for every variant, the bound pipeline has zero copies except the
  listed refreshed tensors (which follow each merge), exports load in diffusers.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from optimizer.architectures.detect import ArchitectureError, canonical_state_dict, check_compatible
from optimizer.architectures.layout import load_layout
from optimizer.checkpoint.convert import from_diffusers, to_diffusers
from optimizer.checkpoint.key_rules import KeyRules
from optimizer.checkpoint.load import load_checkpoint
from optimizer.cli import app
from optimizer.testing.tiny_dit import (
    TINY_DIT_VARIANTS,
    tiny_dit_canonical_state_dict,
    tiny_dit_components,
    tiny_dit_config_dir,
    write_tiny_dit_diffusers,
    write_tiny_dit_single_file,
)
from tests.zoo_clip import ZOO_CLIP

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
VARIANTS = list(TINY_DIT_VARIANTS)


def _mecha_config(name: str) -> dict:
    sd_mecha = pytest.importorskip("sd_mecha", reason="sd-mecha (a dev dependency) publishes the model configs")
    root = Path(sd_mecha.__file__).parent / "extensions" / "builtin" / "model_configs"
    return yaml.safe_load((root / name).read_text())["components"]


def _pattern(key: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", key)


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[dict, dict]]:
    """variant -> (parent A modules, parent B modules)."""
    return {v: (tiny_dit_components(v, seed=0), tiny_dit_components(v, seed=1)) for v in VARIANTS}


# ------------------------------------------------------------------------------ outside truth
def test_tiny_flux_keys_are_sd_mechas_flux_keys(models) -> None:
    mecha = _mecha_config("flux-flux.yaml")
    ours = tiny_dit_canonical_state_dict(models["flux-dev"][0], "flux-dev")
    diffuser = {k for k in ours if k.startswith("model.diffusion_model.")}
    assert diffuser == set(mecha["diffuser"])  # exact: every block of the real model
    for component, prefix in (("clip_l", "text_encoders.clip_l."), ("t5xxl", "text_encoders.t5xxl."), ("vae", "vae.")):
        assert {_pattern(k) for k in ours if k.startswith(prefix)} == {_pattern(k) for k in mecha[component]}, component
    # the bare BFL names are sd-mecha's aliases
    aliases = {a for v in mecha["diffuser"].values() for a in v.get("aliases", [])}
    assert {k.removeprefix("model.diffusion_model.") for k in diffuser} == aliases


def test_tiny_sd3_keys_are_sd_mechas_sd3_keys(models) -> None:
    mecha = _mecha_config("sd3-comfyui.yaml")
    ours = tiny_dit_canonical_state_dict(models["sd3"][0], "sd3")
    ignore = re.compile(r"logit_scale$|^model\.model_sampling\.")
    assert {k for k in ours if k.startswith("model.diffusion_model.")} == {k for k in mecha["diffuser"] if not ignore.search(k)}
    for component, prefix in (("clip_l", "text_encoders.clip_l."), ("clip_g", "text_encoders.clip_g."),
                              ("t5xxl", "text_encoders.t5xxl."), ("vae", "first_stage_model.")):
        theirs = {_pattern(k) for k in mecha[component] if not ignore.search(k)}
        assert {_pattern(k) for k in ours if k.startswith(prefix)} == theirs, component


def test_shipped_flux_config_builds_sd_mechas_shapes() -> None:
    from optimizer.checkpoint.config_dir import diffusers_config_dir
    from optimizer.checkpoint.convert import build_empty_module, module_configs

    mecha = _mecha_config("flux-flux.yaml")["diffuser"]
    layout = load_layout("flux")
    config = module_configs(diffusers_config_dir("flux"), layout)["transformer"]
    model = build_empty_module("diffusers.FluxTransformer2DModel", config, name="transformer")
    canonical = from_diffusers(modules={"transformer": model.state_dict()}, layout=layout, configs={})
    assert {k: list(v.shape) for k, v in canonical.items()} == {k: v["shape"] for k, v in mecha.items()}


def _real_width_checkpoint(component: dict) -> dict[str, torch.Tensor]:
    """sd-mecha's keys at their real dim 0 (other dims 1: the converters only cut dim 0), each
    row a distinct number, so any reordering or misplaced cut shows."""
    out, start = {}, 0
    for key, spec in component.items():
        shape = spec["shape"]
        rows = shape[0] if shape else 1
        out[key.removeprefix("model.diffusion_model.")] = (torch.arange(rows, dtype=torch.float64) + start).reshape(
            (rows,) + (1,) * (len(shape) - 1)
        )
        start += rows
    return out


@pytest.mark.parametrize(("config", "architecture", "converter"), [
    ("flux-flux.yaml", "flux", "convert_flux_transformer_checkpoint_to_diffusers"),
    ("sd3-comfyui.yaml", "sd3", "convert_sd3_transformer_checkpoint_to_diffusers"),
])
def test_key_rules_agree_with_diffusers_converters_at_real_widths(config: str, architecture: str, converter: str) -> None:
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = _real_width_checkpoint(
        {k: v for k, v in _mecha_config(config)["diffuser"].items() if not k.startswith("model.model_sampling")}
    )
    theirs = getattr(sfu, converter)(dict(checkpoint))
    rules = KeyRules(load_layout(architecture).spec.key_rules)
    ours, new = rules.to_diffusers(checkpoint)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert set(new) == {k for k in ours if k.startswith("norm_out.") or (architecture == "sd3" and ".23.norm1_context" in k)}
    for key, tensor in ours.items():  # everything not swapped is the canonical tensor or a view of it
        if key not in new:
            assert any(tensor.data_ptr() >= c.data_ptr() and tensor.data_ptr() < c.data_ptr() + c.numel() * c.element_size()
                       for c in checkpoint.values()), key
    back = rules.from_diffusers(ours)
    assert set(back) == set(checkpoint) and all(torch.equal(back[k], checkpoint[k]) for k in checkpoint)


@pytest.mark.parametrize("variant", VARIANTS)
def test_canonical_round_trip_and_module_conversion_are_exact(models, variant: str) -> None:
    components = models[variant][0]
    layout = load_layout(TINY_DIT_VARIANTS[variant][0])
    canonical = tiny_dit_canonical_state_dict(components, variant)
    layout.assign(canonical)  # every key has exactly one block or component
    converted = to_diffusers(state_dict=canonical, layout=layout, config_dir=tiny_dit_config_dir(components, variant))
    for name, module in components.items():
        reference = {k: v for k, v in module.state_dict().items() if k != "encoder.embed_tokens.weight"}
        assert set(converted.modules[name]) == set(reference), name
        assert all(torch.equal(converted.modules[name][k], v) for k, v in reference.items()), name


# ------------------------------------------------------------------------------ file formats
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_file_format_loads_to_the_same_canonical_weights(models, variant: str, tmp_path: Path) -> None:
    components = models[variant][0]
    architecture = TINY_DIT_VARIANTS[variant][0]
    single = load_checkpoint(write_tiny_dit_single_file(tmp_path / "a.safetensors", components, variant))
    assert single.architecture == architecture
    folder = load_checkpoint(write_tiny_dit_diffusers(tmp_path / "a-diffusers", components, variant))
    assert folder.architecture == architecture and folder.source_format == "diffusers"
    assert set(folder.state_dict) == set(single.state_dict)
    assert all(torch.equal(folder.state_dict[k], v) for k, v in single.state_dict.items())
    bare = load_checkpoint(write_tiny_dit_single_file(tmp_path / "bare.safetensors", components, variant, bare=True))
    assert bare.architecture == architecture
    assert set(bare.state_dict) == {k for k in single.state_dict if k.startswith("model.diffusion_model.")}
    # another tool's prefix for the VAE, and keys that are not weights (logit_scale, model_sampling)
    from safetensors.torch import save_file

    layout = load_layout(architecture)
    alias = layout.spec.aliases[0]
    canonical_vae = alias.canonical
    odd = {(alias.prefix + k[len(canonical_vae):] if k.startswith(canonical_vae) else k): v.contiguous()
           for k, v in single.state_dict.items()}
    odd["text_encoders.clip_l.logit_scale"] = torch.tensor(4.6)
    odd["model.model_sampling.sigmas"] = torch.ones(3)
    save_file(odd, str(tmp_path / "comfy.safetensors"))
    comfy = load_checkpoint(tmp_path / "comfy.safetensors")
    assert set(comfy.state_dict) == set(single.state_dict)


def test_variants_and_architectures_are_refused_before_any_work(models, tmp_path: Path) -> None:
    dev = write_tiny_dit_single_file(tmp_path / "dev.safetensors", models["flux-dev"][0], "flux-dev")
    schnell = write_tiny_dit_single_file(tmp_path / "schnell.safetensors", models["flux-schnell"][0], "flux-schnell")
    result = runner.invoke(app, ["merge", str(dev), str(schnell), "-o", str(tmp_path / "out.safetensors")])
    assert result.exit_code == 2 and "different variants" in result.output and "dev" in result.output
    assert not (tmp_path / "out.safetensors").exists()
    sd3 = tiny_dit_canonical_state_dict(models["sd3"][0], "sd3")
    sd35 = tiny_dit_canonical_state_dict(models["sd3.5"][0], "sd3.5")
    with pytest.raises(ArchitectureError, match="different variants"):
        check_compatible([sd3, sd35], names=["a", "b"])
    large = tiny_dit_canonical_state_dict(models["sd35_large"][0], "sd35_large")
    with pytest.raises(ArchitectureError, match=r"\(sd3\) with b \(sd35_large\)"):
        check_compatible([sd35, large], names=["a", "b"])


def test_an_unknown_architecture_names_the_closest_and_what_differs(models) -> None:
    state = tiny_dit_canonical_state_dict(models["flux-dev"][0], "flux-dev")
    cut = {k: v for k, v in state.items() if not k.startswith("model.diffusion_model.single_blocks.37.")}
    cut["model.diffusion_model.lora_unet_extra.weight"] = torch.zeros(1)
    with pytest.raises(ArchitectureError) as info:
        canonical_state_dict(cut, source="odd.safetensors")
    message = str(info.value)
    assert "closest is flux" in message and "model.diffusion_model.single_blocks.37." in message
    assert "model.diffusion_model.lora_unet_extra" in message and "\n" not in message


# ------------------------------------------------------------------------------ merge methods
def test_every_merge_method_on_a_flux_bank_equals_the_reference(models) -> None:
    from optimizer.merge import Merger, MergeRecipe, ParentBank, available_methods, get_method
    from optimizer.merge.reference import merge_state_dicts_reference

    layout = load_layout("flux")
    parents = [tiny_dit_canonical_state_dict(m, "flux-schnell") for m in (*models["flux-schnell"], tiny_dit_components("flux-schnell", seed=2))]
    parents = [{k: v for k, v in p.items() if k.startswith("model.diffusion_model.")} for p in parents]
    bank = ParentBank.build(state_dicts=parents, layout=layout)
    assert bank.segments["guidance_in"].numel == 0  # schnell: the block owns no keys
    banks = {3: bank, 2: ParentBank.build(state_dicts=parents[:2], layout=layout)}
    for name in available_methods():
        n = get_method(name).min_parents
        m, sds = Merger(banks[n], backend="torch"), parents[:n]
        recipe = MergeRecipe.uniform(method=name, layout=layout, seed=3)
        m.merge(recipe)
        reference = merge_state_dicts_reference(state_dicts=sds, layout=layout, recipe=recipe)
        views = m.state_dict()
        for key, tensor in reference.items():
            assert torch.allclose(views[key], tensor, atol=1e-6, rtol=1e-5), (name, key)


# ------------------------------------------------------------------------------ studies
def _study(tmp: Path, parents: list[Path], config_dir: Path, name: str) -> Path:
    from optimizer.zoo.prompts import zoo_prompt_set_data

    prompts = zoo_prompt_set_data()
    prompts.update(search=prompts["search"][:2], held_out=prompts["held_out"][:2], steps=2, width=32, height=32, scheduler=None)
    (tmp / "prompts.yaml").write_text(yaml.safe_dump(prompts))
    study = {
        "name": name, "parents": [str(p) for p in parents], "config_dir": str(config_dir),
        "search_space": {"alpha": {"low": 0.0, "high": 1.0}}, "sampler": {"name": "random", "seed": 1},
        "pruner": {"name": "none"}, "objectives": ["clip"], "scorers": dict(ZOO_CLIP),
        "prompts": "prompts.yaml", "render": {"batch_size": 2, "grid_images": 2}, "budget": {"trials": 2},
        "calibration": {"gate": False},  # random-weight tiny models render noise, which the sanity gate rightly refuses
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _assert_bound_to_buffer(runner_obj) -> None:
    """Every parameter of every pipeline module is a view of the merge buffer, except the listed refreshed ones."""
    from optimizer.study.pipeline import denoiser, refreshed_tensors

    pipe = runner_obj.renderer.pipe
    buffer = runner_obj.technique.merger.output
    low, high = buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size()
    refreshed = set(refreshed_tensors(pipe))
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        for pname, param in module.named_parameters():
            inside = low <= param.data_ptr() < high
            assert inside != (module is denoiser(pipe) and pname in refreshed), (name, pname)


def _sanity_gate_renders_the_parents(trial_runner, layout, *, merge_vae: bool, tmp: Path) -> None:
    """The calibration set's parent renders (``Merger.load_parent``) are each parent's own renders,
    seed for seed: parent 0's equal a merge at alpha 0; parent 1's a merge at alpha 0 of the same
    study with the parents swapped (components included; a merge at alpha 1 has parent 0's components
    unless ``merge_vae``, which only SD layouts have)."""
    from optimizer.merge import MergeRecipe
    from optimizer.study.calibration import render_parents
    from optimizer.study.runner import StudyRunner
    from optimizer.study.storage import StudyFolder

    pipe = trial_runner.renderer.pipe
    training = [name for name, c in pipe.components.items() if isinstance(c, torch.nn.Module) and any(m.training for m in c.modules())]
    assert not training, f"modules in training mode (dropout on: renders differ run to run): {training}"
    images, prompts = render_parents(trial_runner, count=1)
    assert images.shape[0] == 2 and prompts[0] == prompts[1]
    jobs = trial_runner.prompt_set.jobs("search")[:1]
    assert torch.equal(trial_runner.renderer.render(jobs), trial_runner.renderer.render(jobs))  # seeded renders repeat exactly
    trial_runner.technique.merger.merge(MergeRecipe.uniform(method="weighted_sum", layout=layout, alpha=0.0, merge_vae=merge_vae))
    assert torch.equal(trial_runner.renderer.render(jobs).float().cpu()[0], images[0])
    config = trial_runner.config
    swapped = StudyRunner(config.model_copy(update={"parents": list(reversed(config.parents))}), folder=StudyFolder(tmp / "swapped"))
    swapped.technique.merger.merge(MergeRecipe.uniform(method="weighted_sum", layout=layout, alpha=0.0, merge_vae=merge_vae))
    assert torch.equal(swapped.renderer.render(jobs).float().cpu()[0], images[1])
    assert not torch.equal(images[0], images[1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_tiny_study_runs_binds_without_copies_and_exports(models, variant: str, tmp_path: Path) -> None:
    import diffusers
    import optuna

    from optimizer.merge import MergeRecipe
    from optimizer.study.config import load_study_config
    from optimizer.study.pipeline import denoiser, refreshed_tensors
    from optimizer.study.runner import StudyRunner
    from optimizer.study.storage import StudyFolder

    a, b = models[variant]
    architecture = TINY_DIT_VARIANTS[variant][0]
    files = [write_tiny_dit_single_file(tmp_path / f"{n}.safetensors", m, variant) for n, m in (("a", a), ("b", b))]
    config_dir = tiny_dit_config_dir(a, variant)
    study_file = _study(tmp_path, files, config_dir, f"t-{variant.replace('.', '')}")
    out = tmp_path / "run"
    result = runner.invoke(app, ["study", "run", str(study_file), "--out", str(out), "--no-progress", "--threads", "1"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name=f"t-{variant.replace('.', '')}", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2

    # zero copies; the refreshed tensors follow every merge
    trial_runner = StudyRunner(load_study_config(out / "study.yaml"), folder=StudyFolder(tmp_path / "replay"))
    _assert_bound_to_buffer(trial_runner)
    pipe = trial_runner.renderer.pipe
    assert set(refreshed_tensors(pipe)) >= {"norm_out.linear.weight", "norm_out.linear.bias"}
    layout = load_layout(architecture)
    for alpha, source in ((1.0, b), (0.0, a)):
        trial_runner.technique.merger.merge(MergeRecipe.uniform(method="weighted_sum", layout=layout, alpha=alpha))
        reference = source["transformer"].state_dict()
        live = denoiser(pipe).state_dict()
        assert all(torch.equal(live[k], reference[k]) for k in reference), alpha
    images = trial_runner.renderer.render(trial_runner.prompt_set.jobs("search"))
    assert images.shape == (2, 3, 32, 32) and bool(torch.isfinite(images).all())
    _sanity_gate_renders_the_parents(trial_runner, layout, merge_vae=False, tmp=tmp_path)

    # export: canonical single file, bare transformer, diffusers folder
    best = study.best_trial
    for fmt, name in (("safetensors", "best.safetensors"), ("bare", "bare.safetensors"), ("diffusers", "best-diffusers")):
        result = runner.invoke(app, ["export", str(out), "--format", fmt, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    from optimizer.study.space import suggest_recipe

    trial_runner.technique.merger.merge(suggest_recipe(optuna.trial.FixedTrial(best.params), trial_runner.space))
    merged = {k: v.clone() for k, v in denoiser(pipe).state_dict().items()}
    cls = getattr(diffusers, layout.spec.pipeline)
    folder = cls.from_pretrained(str(tmp_path / "best-diffusers"), local_files_only=True)
    assert all(torch.equal(folder.transformer.state_dict()[k], v) for k, v in merged.items())
    single = load_checkpoint(tmp_path / "best.safetensors").state_dict
    bare = load_checkpoint(tmp_path / "bare.safetensors").state_dict
    assert all(torch.equal(bare[k], single[k]) for k in bare)
    if architecture != "flux":
        # diffusers' own single-file loaders read our files (Flux's converter hard-codes the 3072
        # width of the real model, so at tiny widths only the key/shape and converter checks above apply)
        transformer_cls = type(folder.transformer)
        for name in ("best.safetensors", "bare.safetensors"):
            loaded = transformer_cls.from_single_file(str(tmp_path / name), config=str(config_dir), subfolder="transformer", local_files_only=True)
            assert all(torch.equal(loaded.state_dict()[k], v) for k, v in merged.items()), name
        whole = cls.from_single_file(str(tmp_path / "best.safetensors"), config=str(config_dir), local_files_only=True)
        assert all(torch.equal(whole.transformer.state_dict()[k], v) for k, v in merged.items())


def test_a_bare_flux_study_takes_the_text_encoders_from_a_local_snapshot(models, tmp_path: Path) -> None:
    import optuna

    a, b = models["flux-dev"]
    files = [write_tiny_dit_single_file(tmp_path / f"{n}.safetensors", m, "flux-dev", bare=True) for n, m in (("a", a), ("b", b))]
    snapshot = write_tiny_dit_diffusers(tmp_path / "FLUX.1-dev", a, "flux-dev")
    study_file = _study(tmp_path, files, snapshot, "bare-flux")
    out = tmp_path / "run"
    result = runner.invoke(app, ["study", "run", str(study_file), "--out", str(out), "--no-progress", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert len(optuna.load_study(study_name="bare-flux", storage=f"sqlite:///{out / 'study.db'}").trials) == 2
    result = runner.invoke(app, ["export", str(out), "--format", "diffusers", "-o", str(tmp_path / "best")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "best" / "text_encoder_2" / "model.safetensors").is_file()  # taken from the snapshot
    # without a snapshot there is no T5 to render with: one clear line
    no_t5 = _study(tmp_path, files, tiny_dit_config_dir(a, "flux-dev"), "bare-flux-2")
    result = runner.invoke(app, ["study", "run", str(no_t5), "--out", str(tmp_path / "run2"), "--no-progress"])
    assert result.exit_code == 2 and "local diffusers folder" in result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------ LoRA
_LORA_MODULES = {
    "flux-dev": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.3.attn.add_v_proj",
                 "single_transformer_blocks.5.attn.to_v", "single_transformer_blocks.5.proj_mlp", "norm_out.linear",
                 "x_embedder", "transformer_blocks.1.ff.net.0.proj"],
    "sd3.5": ["transformer_blocks.0.attn.to_q", "transformer_blocks.2.attn.add_k_proj", "transformer_blocks.1.attn2.to_v",
              "transformer_blocks.23.norm1_context.linear", "norm_out.linear", "context_embedder", "transformer_blocks.4.ff.net.2"],
}


def _merged_with(lora_path: Path, *, variant: str, components: dict, config_dir: Path) -> dict[str, torch.Tensor]:
    """The diffusers transformer weights of parent A with the LoRA added at strength 1 by evomerge."""
    from optimizer.adapters.lora import load_loras
    from optimizer.merge import Merger, MergeRecipe, ParentBank

    layout = load_layout(TINY_DIT_VARIANTS[variant][0])
    state = tiny_dit_canonical_state_dict(components, variant)
    bank = ParentBank.build(state_dicts=[state, state], layout=layout)
    loras = load_loras([("x", lora_path)], bank=bank, unet_config={})
    merger = Merger(bank, loras=loras)
    recipe = MergeRecipe.uniform(method="weighted_sum", layout=layout, alpha=0.0)
    merger.merge(recipe.model_copy(update={"loras": {"x": dict.fromkeys(loras[0].blocks, 1.0)}}))
    return to_diffusers(state_dict=merger.state_dict(), layout=layout, config_dir=config_dir).modules["transformer"]


@pytest.mark.parametrize("variant", ["flux-dev", "sd3.5"])
def test_a_diffusers_format_lora_adds_what_diffusers_fuses(models, variant: str, tmp_path: Path) -> None:
    import diffusers
    from safetensors.torch import save_file

    components = models[variant][0]
    reference = components["transformer"].state_dict()
    generator = torch.Generator().manual_seed(0)
    factors = {}
    for module in _LORA_MODULES[variant]:
        out, inp = reference[module + ".weight"].shape
        factors[f"transformer.{module}.lora_A.weight"] = torch.randn(2, inp, generator=generator)
        factors[f"transformer.{module}.lora_B.weight"] = torch.randn(out, 2, generator=generator)
    save_file(factors, str(tmp_path / "lora.safetensors"))
    config_dir = tiny_dit_config_dir(components, variant)
    ours = _merged_with(tmp_path / "lora.safetensors", variant=variant, components=components, config_dir=config_dir)
    cls = getattr(diffusers, load_layout(TINY_DIT_VARIANTS[variant][0]).spec.pipeline)
    pipe = cls.from_pretrained(str(write_tiny_dit_diffusers(tmp_path / "pipe", components, variant)), local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    pipe.fuse_lora(lora_scale=1.0)
    fused = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    changed = [k for k in ours if not torch.equal(ours[k], reference[k])]
    assert len(changed) == len(_LORA_MODULES[variant])  # fused q/k/v parts and swapped halves land where they belong
    assert all(torch.allclose(ours[k], fused[k], atol=1e-5) for k in reference)


def test_a_kohya_flux_lora_maps_onto_the_bfl_weights(models, tmp_path: Path) -> None:
    import diffusers
    from safetensors.torch import save_file

    components = models["flux-dev"][0]
    state = tiny_dit_canonical_state_dict(components, "flux-dev")
    generator = torch.Generator().manual_seed(1)
    factors = {}
    names = {"double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv", "single_blocks_2_linear2": "single_blocks.2.linear2",
             "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1"}
    for kohya, bfl in names.items():
        out, inp = state[f"model.diffusion_model.{bfl}.weight"].shape
        factors[f"lora_unet_{kohya}.lora_down.weight"] = torch.randn(2, inp, generator=generator)
        factors[f"lora_unet_{kohya}.lora_up.weight"] = torch.randn(out, 2, generator=generator)
        factors[f"lora_unet_{kohya}.alpha"] = torch.tensor(1.0)  # scale alpha / rank = 0.5
    save_file(factors, str(tmp_path / "kohya.safetensors"))
    config_dir = tiny_dit_config_dir(components, "flux-dev")
    ours = _merged_with(tmp_path / "kohya.safetensors", variant="flux-dev", components=components, config_dir=config_dir)
    reference = components["transformer"].state_dict()
    pipe = diffusers.FluxPipeline.from_pretrained(str(write_tiny_dit_diffusers(tmp_path / "pipe", components, "flux-dev")), local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    pipe.fuse_lora(lora_scale=1.0)
    fused = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    for key in reference:
        if not key.startswith("norm_out."):
            assert torch.allclose(ours[key], fused[key], atol=1e-5), key
    # diffusers 0.42 drops a kohya final_layer LoRA (its converter consumes the alpha and applies
    # nothing); the BFL weight gets 0.5 * up @ down and diffusers' norm_out sees it with halves swapped
    delta = 0.5 * factors["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"] @ factors["lora_unet_final_layer_adaLN_modulation_1.lora_down.weight"]
    half = delta.shape[0] // 2
    assert torch.allclose(ours["norm_out.linear.weight"] - reference["norm_out.linear.weight"], torch.cat([delta[half:], delta[:half]]), atol=1e-5)


def test_a_flux_study_searches_lora_strengths_per_block(models, tmp_path: Path) -> None:
    import optuna
    from safetensors.torch import save_file

    a, b = models["flux-dev"]
    files = [write_tiny_dit_single_file(tmp_path / f"{n}.safetensors", m, "flux-dev") for n, m in (("a", a), ("b", b))]
    reference = a["transformer"].state_dict()
    generator = torch.Generator().manual_seed(2)
    factors = {}
    for module in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.3.proj_mlp", "norm_out.linear"):
        out, inp = reference[module + ".weight"].shape
        factors[f"transformer.{module}.lora_A.weight"] = torch.randn(2, inp, generator=generator)
        factors[f"transformer.{module}.lora_B.weight"] = torch.randn(out, 2, generator=generator)
    save_file(factors, str(tmp_path / "style.safetensors"))
    study_file = _study(tmp_path, files, tiny_dit_config_dir(a, "flux-dev"), "flux-lora")
    data = yaml.safe_load(study_file.read_text())
    data["loras"] = [{"path": str(tmp_path / "style.safetensors"), "name": "style",
                      "strength": {"low": 0.0, "high": 1.0, "share": "per_block"}}]
    study_file.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    result = runner.invoke(app, ["study", "run", str(study_file), "--out", str(out), "--no-progress", "--threads", "1"])
    assert result.exit_code == 0, result.output
    trial = optuna.load_study(study_name="flux-lora", storage=f"sqlite:///{out / 'study.db'}").trials[0]
    assert {p for p in trial.params if p.startswith("lora")} == {
        "lora.style.double_blocks.0", "lora.style.single_blocks.3", "lora.style.final_layer"}


@pytest.mark.parametrize("config", ["sd35_medium", "sd35_large", "flux", "flux_schnell"])
def test_every_shipped_dit_config_builds_its_modules_and_blocks(config: str) -> None:
    from optimizer.architectures.detect import shipped_config_name, variant_of
    from optimizer.checkpoint.config_dir import diffusers_config_dir
    from optimizer.checkpoint.convert import empty_modules

    architecture = {"sd35_medium": "sd3", "sd35_large": "sd35_large"}.get(config, "flux")
    layout = load_layout(architecture)
    folder = diffusers_config_dir(config)
    names = [m.name for m in layout.spec.modules]
    modules = empty_modules(layout=layout, config_dir=folder, names=names)
    canonical = from_diffusers(modules={n: m.state_dict() for n, m in modules.items()}, layout=layout,
                               configs={"vae": dict(modules["vae"].config)})
    owners = layout.assign(canonical).owner
    assert set(owners.values()) >= set(layout.blocks) - {"guidance_in"}  # every block owns keys
    assert shipped_config_name(layout, list(canonical)) == config
    if architecture == "sd3":
        assert variant_of(layout, list(canonical)) == "sd3.5"


def test_merge_vae_on_a_dit_layout_is_one_clear_line_before_anything_is_written(models, tmp_path: Path) -> None:
    """DiT layouts have no BASE block for the components (VAE, text encoders) to take parameters from."""
    a, b = models["sd3"]
    files = [write_tiny_dit_single_file(tmp_path / f"{n}.safetensors", m, "sd3") for n, m in (("a", a), ("b", b))]
    result = runner.invoke(app, ["merge", *map(str, files), "--alpha", "0.5", "--merge-vae", "-o", str(tmp_path / "m.safetensors")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "merge_vae: sd3 has no BASE block" in lines[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]
