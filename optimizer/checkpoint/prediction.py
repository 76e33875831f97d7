"""What a checkpoint predicts (``epsilon`` or ``v_prediction``): SD2 512-base vs 768-v.

The keys do not tell (both SD2 variants have the same tensors). Where the file says, this reads it:

* a diffusers folder: ``scheduler/scheduler_config.json`` ``prediction_type``;
* safetensors metadata ``modelspec.prediction_type`` (Stability's model spec: ``epsilon`` / ``v``);
* A1111's convention, a ``<stem>.yaml`` LDM config beside the file: ``model.params.parameterization``
  (``v``; absent means ``eps``);
* ComfyUI's convention: a checkpoint it saved from a v-prediction model carries an empty ``v_pred``
  tensor (:data:`COMFY_V_PRED_KEY`, dropped on load like the other non-weights).

Merged outputs say it again: ``modelspec.prediction_type`` in safetensors metadata
(:func:`prediction_metadata`) and the scheduler config of a diffusers folder.

Parents whose known prediction types differ are refused before any work; a study renders with the
parents' prediction type whatever the config folder's scheduler says.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path

import yaml

__all__ = ["COMFY_V_PRED_KEY", "PREDICTION_TYPES", "prediction_metadata", "read_prediction_type"]

PREDICTION_TYPES = ("epsilon", "v_prediction")
#: the marker key ComfyUI's ``state_dict_for_saving`` writes for v-prediction models
COMFY_V_PRED_KEY = "v_pred"
_MODELSPEC = {"epsilon": "epsilon", "v_prediction": "v"}
_NAMES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}


def _normal(value: object) -> str | None:
    return _NAMES.get(str(value).strip().lower()) if value is not None else None


def prediction_metadata(prediction_type: str | None) -> dict[str, str]:
    """``{"modelspec.prediction_type": "epsilon" | "v"}`` for a known type, else ``{}``."""
    return {"modelspec.prediction_type": _MODELSPEC[prediction_type]} if prediction_type in _MODELSPEC else {}


def read_prediction_type(
    path: Path, *, metadata: Mapping[str, str], source_format: str, keys: Collection[str] = ()
) -> str | None:
    """``"epsilon"``, ``"v_prediction"`` or ``None`` (the file does not say).

    ``keys``: the file's raw tensor names (before non-weights are dropped), for ComfyUI's marker.
    """
    if COMFY_V_PRED_KEY in keys:
        return "v_prediction"
    if source_format == "diffusers":
        config = path / "scheduler" / "scheduler_config.json"
        try:
            return _normal(json.loads(config.read_text(encoding="utf-8")).get("prediction_type"))
        except (OSError, ValueError, AttributeError):
            return None
    found = _normal(metadata.get("modelspec.prediction_type"))
    if found:
        return found
    beside = path.with_suffix(".yaml")
    if beside.is_file():
        try:
            doc = yaml.safe_load(beside.read_text(encoding="utf-8"))
            params = doc["model"]["params"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            return None
        return _normal(params.get("parameterization", "eps")) if isinstance(params, dict) else None
    return None
