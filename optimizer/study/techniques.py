"""The techniques a study searches: how a recipe becomes what the pipeline renders, and what exports.

A technique is built once per study from the loaded parents and LoRAs; per trial,
:meth:`Technique.prepare` makes its pipeline (:attr:`Technique.pipe`) render a recipe. Each owns
its set-up, its per-trial steps and their order, its export rule and its study-file rules, so the
runner, the export and the study file compose it instead of branching on ``technique:``.

* ``merge`` (:class:`MergedWeights`): the merge kernel writes the candidate into the buffer the
  pipeline's weights are views of; LoRAs are added in the kernel; with ``recalibrate`` the norms are
  corrected between the merge and the LoRAs (the correction is the merge's, the LoRA's change is
  not corrected). Its weights export.
* ``output_ensemble`` (:class:`OutputEnsemble`): both parents' denoisers run at every sampler step
  and their noise predictions are mixed ``(1 - alpha) eps_A + alpha eps_B``; nothing is merged, so
  only the recipe exports.

Both attach the study's hypernetworks to their denoiser(s) (strengths set per trial, after the
technique's own steps) and swap in TAESD when the study renders with it. A new technique is one
subclass registered with :func:`register_technique`; the study file's ``technique:`` accepts it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from optimizer.errors import EvomergeError
from optimizer.merge import Merger, MergeRecipe
from optimizer.merge_files import LoadedParents, load_parents

if TYPE_CHECKING:
    from optimizer.study.config import StudyConfig

__all__ = [
    "TECHNIQUES", "MergedWeights", "OutputEnsemble", "Technique", "TechniqueError", "build_technique", "register_technique", "study_loras",
    "study_dtype", "study_parents", "technique_class",
]


class TechniqueError(EvomergeError, ValueError):
    """An unknown technique, or a step the technique does not have (exporting an ensemble's weights)."""


def study_dtype(config: StudyConfig) -> str | None:
    """The bank dtype of a study: the study file's, else fp32 on CPU (fp16 kernels are slow there), else the parents'."""
    if config.dtype is not None:
        return config.dtype
    from optimizer.merge_files import resolve_device

    return "fp32" if resolve_device(config.device).type == "cpu" else None


def study_parents(config: StudyConfig) -> LoadedParents:
    """The parents of ``config`` loaded as every step of a study loads them (dtype, device, placement)."""
    return load_parents(paths=config.parents, dtype=study_dtype(config), device=config.device, placement=config.placement,
                        allow_nonfinite=config.allow_nonfinite)


def study_loras(config: StudyConfig, parents: LoadedParents) -> list:
    """The study's LoRAs, mapped onto ``parents``' keys (``[]`` without LoRAs)."""
    if not config.loras:
        return []
    from optimizer.adapters.lora import load_loras
    from optimizer.study.pipeline import unet_config

    return load_loras([(l.resolved_name, l.path) for l in config.loras], bank=parents.bank,
                      unet_config=unet_config(parents, config_dir=config.config_dir))


class Technique(ABC):
    """One way of turning a recipe into what a pipeline renders (see the module docstring).

    Built once per study: ``config`` (the study file), ``parents`` (loaded), ``loras`` (mapped onto
    the parents), ``search_prompts`` (the calibration batch of a technique that needs one)."""

    #: the study file's ``technique:`` value
    name: ClassVar[str]
    #: whether the result is one set of weights (a checkpoint); else only the recipe exports
    exports_weights: ClassVar[bool]

    def __init__(self, *, config: StudyConfig, parents: LoadedParents, loras: Sequence[Any] = (), search_prompts: Sequence[str] = ()) -> None:
        self.parents = parents
        self.loras = list(loras)
        pipe, denoisers = self._pipeline(config)
        self.hypernetworks = _attach_hypernetworks(config, denoisers=denoisers, parents=parents)
        if config.render.decoder == "taesd":
            from optimizer.render.taesd import with_taesd_decoder

            pipe = with_taesd_decoder(pipe, directory=config.render.taesd, architecture=parents.bank.layout.name)
        self.pipe = pipe
        self._ready(config, search_prompts=search_prompts)

    # ---------------------------------------------------------------- what a subclass provides
    @abstractmethod
    def _pipeline(self, config: StudyConfig) -> tuple[Any, list[torch.nn.Module]]:
        """``(pipeline, denoisers)``: the pipeline this technique renders with and the denoiser(s)
        hypernetworks attach to."""

    def _ready(self, config: StudyConfig, *, search_prompts: Sequence[str]) -> None:
        """Set-up that needs the finished pipeline (TAESD swapped in)."""

    @abstractmethod
    def _apply(self, recipe: MergeRecipe) -> dict[str, float]:
        """The technique's own steps for ``recipe``; seconds per step."""

    @abstractmethod
    def show_parent(self, index: int) -> None:
        """Make the pipeline render parent ``index`` alone (calibration renders each parent)."""

    @classmethod
    def check_config(cls, config: StudyConfig) -> None:
        """Study-file rules of this technique: ``ValueError`` naming the field."""

    # ---------------------------------------------------------------- shared
    def prepare(self, recipe: MergeRecipe) -> dict[str, float]:
        """Make :attr:`pipe` render ``recipe``: the technique's steps, then the hypernetworks'
        strengths. Returns seconds per step (``merge``, ``recalibrate``, ``lora``)."""
        seconds = self._apply(recipe)
        if self.hypernetworks is not None:
            self.hypernetworks.set_strengths({h.name: recipe.hypernetworks.get(h.name, 0.0) for h in self.hypernetworks})
        return seconds

    @property
    def searches_weights(self) -> bool:
        """Whether a recipe's per-block values change weights (so equal blocks are inert)."""
        return self.exports_weights

    @property
    def evaluations_per_step(self) -> int:
        """Denoiser evaluations per sampler step and image."""
        return 1

    @classmethod
    def export_refusal(cls, output_format: str) -> str | None:
        """Why ``output_format`` cannot be written for this technique, or ``None``."""
        return None

    @classmethod
    def export_state(cls, *, config: StudyConfig, parents: LoadedParents, recipe: MergeRecipe,
                     built: Technique | None = None) -> dict[str, torch.Tensor] | None:
        """The weights ``recipe`` exports to (``None``: a plain merge the kernel streams to a file)."""
        raise TechniqueError(f"technique {cls.name} has no weights to export")

    @classmethod
    def export_hint(cls, root: Any) -> str:
        """The end-of-study export command."""
        return f"export: evomerge export {root} --format safetensors -o best.safetensors"


def _attach_hypernetworks(config: StudyConfig, *, denoisers: Sequence[torch.nn.Module], parents: LoadedParents):
    """The study's hypernetworks installed on every denoiser, strengths 0 (``None`` without any)."""
    if not config.hypernetworks:
        return None
    from optimizer.adapters.hypernetwork import HypernetworkStack, install_hypernetworks, load_hypernetwork

    bank = parents.bank
    stack = HypernetworkStack([load_hypernetwork(h.path, device=bank.device, dtype=bank.dtype) for h in config.hypernetworks])
    for h, loaded in zip(config.hypernetworks, stack, strict=True):
        loaded.name = h.resolved_name
    stack.set_strengths([0.0] * len(stack))
    for unet in denoisers:
        install_hypernetworks(unet, stack)
    return stack


class MergedWeights(Technique):
    """``merge``: the kernel merges into the pipeline's weights; LoRAs in the kernel; optional norm
    recalibration between the merge and the LoRAs."""

    name = "merge"
    exports_weights = True

    def _pipeline(self, config: StudyConfig):
        from optimizer.study.pipeline import bound_pipeline, denoiser

        self.merger = Merger(self.parents.bank, loras=self.loras)
        pipe = bound_pipeline(merger=self.merger, parents=self.parents, config_dir=config.config_dir)
        return pipe, [denoiser(pipe)]

    def _ready(self, config: StudyConfig, *, search_prompts: Sequence[str]) -> None:
        self.recalibrator = None
        if config.recalibrate is not None:
            from optimizer.study.recalibration import StudyRecalibrator

            self.recalibrator = StudyRecalibrator(pipe=self.pipe, merger=self.merger, prompts=list(search_prompts), config=config.recalibrate)

    def _apply(self, recipe: MergeRecipe) -> dict[str, float]:
        seconds: dict[str, float] = {}
        if self.recalibrator is None:
            stats = self.merger.merge(recipe)
            seconds["merge"] = stats.seconds
            if stats.lora_layers:
                seconds["lora"] = stats.lora_seconds
            return seconds
        seconds["merge"] = self.merger.merge(recipe, with_loras=False).seconds
        if self.hypernetworks is not None:  # the statistics are the merge's alone
            self.hypernetworks.set_strengths([0.0] * len(self.hypernetworks))
        seconds["recalibrate"] = self.recalibrator.apply(recipe).seconds
        lora = self.merger.add_loras(recipe)
        if lora is not None:
            seconds["lora"] = lora.seconds
        return seconds

    def show_parent(self, index: int) -> None:
        self.merger.load_parent(index)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the pipeline renders now (views of the merge buffer)."""
        return self.merger.state_dict()

    @classmethod
    def check_config(cls, config: StudyConfig) -> None:
        if config.recalibrate is not None and config.method != "weighted_sum":
            raise ValueError("recalibrate: the target statistics interpolate the parents with the recipe's alphas; it needs method weighted_sum")

    @classmethod
    def export_state(cls, *, config: StudyConfig, parents: LoadedParents, recipe: MergeRecipe,
                     built: Technique | None = None) -> dict[str, torch.Tensor] | None:
        """The weights ``recipe`` exports to, when the kernel alone cannot stream them to a file:
        with recalibration the study's own steps are replayed (through ``built``, or a technique
        built here on ``parents``); with LoRAs they are added in the kernel. ``None``: a plain merge,
        which :func:`~optimizer.merge_files.merge_to_file` streams."""
        if config.recalibrate is not None:
            if built is None:
                from optimizer.render.prompts import load_prompt_set

                prompts = [p.prompt for p in load_prompt_set(config.prompts).prompts("search")]
                built = cls(config=config, parents=parents, loras=study_loras(config, parents), search_prompts=prompts)
            built.prepare(recipe)
            return built.state_dict()
        if config.loras:
            merger = Merger(parents.bank, loras=study_loras(config, parents))
            merger.merge(recipe)
            return merger.state_dict()
        return None


class OutputEnsemble(Technique):
    """``output_ensemble``: the parents' noise predictions mixed ``(1 - alpha, alpha)`` at every step."""

    name = "output_ensemble"
    exports_weights = False

    def _pipeline(self, config: StudyConfig):
        from optimizer.render.ensemble import ensemble_pipeline
        from optimizer.study.pipeline import denoiser, parent_pipeline

        n = self.parents.bank.n_parents
        members = [parent_pipeline(parents=self.parents, index=i, config_dir=config.config_dir) for i in range(n)]
        pipe = ensemble_pipeline(pipes=members, weights=[1.0] + [0.0] * (n - 1))
        self.ensemble = denoiser(pipe)
        self.layout = self.parents.bank.layout
        return pipe, list(self.ensemble.members)

    def _apply(self, recipe: MergeRecipe) -> dict[str, float]:
        alpha = recipe.params["alpha"][self.layout.blocks[0]]
        self.ensemble.set_weights([1.0 - alpha, alpha])
        return {}

    def show_parent(self, index: int) -> None:
        self.ensemble.set_weights([1.0 if i == index else 0.0 for i in range(self.parents.bank.n_parents)])

    @property
    def evaluations_per_step(self) -> int:
        return sum(1 for w in self.ensemble.weights if w != 0.0)

    @classmethod
    def export_refusal(cls, output_format: str) -> str | None:
        if output_format == "recipe":
            return None
        return (f"an output ensemble mixes the parents' predictions at each sampler step: it is not a merge, so it has no "
                f"{output_format} form; export --format recipe")

    @classmethod
    def export_hint(cls, root: Any) -> str:
        return f"export: evomerge export {root} --format recipe -o best.yaml   (an output ensemble is not one checkpoint)"

    @classmethod
    def check_config(cls, config: StudyConfig) -> None:
        if config.method != "weighted_sum" or len(config.parents) != 2:
            raise ValueError("technique: output_ensemble mixes two parents' noise predictions with weights (1 - alpha, alpha); use method weighted_sum and two parents")
        if config.loras or config.recalibrate is not None or config.merge_vae:
            raise ValueError("technique: output_ensemble merges no weights; loras, recalibrate and merge_vae do not apply")
        alpha = config.search_space.get("alpha")
        if alpha is not None and alpha.value is None and alpha.share != "global":
            raise ValueError("search_space.alpha: an output ensemble has one weight; set share: global")


#: the registered techniques by study-file name
TECHNIQUES: dict[str, type[Technique]] = {}


def register_technique(cls: type[Technique]) -> type[Technique]:
    """Register a :class:`Technique` subclass under its ``name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Technique)) or not getattr(cls, "name", None):
        raise TypeError(f"{cls!r} is not a Technique subclass with a name")
    TECHNIQUES[cls.name] = cls
    return cls


register_technique(MergedWeights)
register_technique(OutputEnsemble)


def technique_class(name: str) -> type[Technique]:
    """The technique registered as ``name``; :class:`TechniqueError` listing the known ones otherwise."""
    try:
        return TECHNIQUES[name]
    except KeyError:
        raise TechniqueError(f"unknown technique {name!r}; use {', '.join(TECHNIQUES)}") from None


def build_technique(config: StudyConfig, *, parents: LoadedParents, loras: Sequence[Any] = (), search_prompts: Sequence[str] = ()) -> Technique:
    """The study's technique, built once (see :class:`Technique`)."""
    return technique_class(config.technique)(config=config, parents=parents, loras=loras, search_prompts=search_prompts)
