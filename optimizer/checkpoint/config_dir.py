"""Offline diffusers config folders (``sd15``, ``sd21``, ``sdxl``, ``sd35_medium``, ``sd35_large``,
``flux``, ``flux_schnell``).

The SD3.5 and Flux.1 folders hold the hub configs of stabilityai/stable-diffusion-3.5-medium /
-large and black-forest-labs/FLUX.1-dev / -schnell and the CLIP tokenizers, but no T5 tokenizer
(its SentencePiece model is a download): a study on those architectures renders with a local
diffusers snapshot as ``config_dir`` (it also supplies the text encoders that bare transformer
files lack). ``extra_files`` adds files (a T5 ``tokenizer.json`` for tiny test models).


The JSON configs of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and
stabilityai/stable-diffusion-xl-base-1.0 ship in ``optimizer/checkpoint/configs/<name>/`` (without
safety checker / feature extractor). One deliberate difference: SDXL's text encoder configs say
``"torch_dtype": "float32"`` (the hub's say ``float16``, the dtype the weights were uploaded in);
transformers >= 5 builds the inner tower of ``CLIPTextModelWithProjection`` in the config dtype,
which would otherwise give a half-float16 text encoder when loading full-precision weights. The
CLIP tokenizer vocabulary is not shipped: it is generated
deterministically from open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz`` (the same BPE the HF
``vocab.json`` / ``merges.txt`` of openai/clip-vit-large-patch14 were made from).

:func:`diffusers_config_dir` materializes a complete folder that
``StableDiffusionPipeline.from_single_file(path, config=<dir>, local_files_only=True)`` (or
``StableDiffusionXLPipeline``) and ``from_pretrained`` accept without touching the network.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from optimizer.checkpoint.hashing import cache_root

__all__ = ["CONFIG_NAMES", "cache_root", "clip_bpe_files", "diffusers_config_dir", "shipped_config"]

CONFIG_NAMES = ("sd15", "sd21", "sdxl", "sd35_medium", "sd35_large", "flux", "flux_schnell")

#: bump when the generated content changes, so stale cached folders are rebuilt
_GENERATOR_VERSION = "1"
_STAMP = ".evomerge-config-stamp"

#: bookkeeping keys of diffusers / transformers configs that never come from an override
_IGNORED_OVERRIDE_KEYS = frozenset({"_class_name", "_name_or_path", "_use_default_values", "_commit_hash"})

_COMPONENT_FILES = {
    "unet_config": "unet/config.json",
    "vae_config": "vae/config.json",
    "text_encoder_config": "text_encoder/config.json",
    "text_encoder_2_config": "text_encoder_2/config.json",
    "text_encoder_3_config": "text_encoder_3/config.json",
    "transformer_config": "transformer/config.json",
}


def _shipped_dir(name: str):
    if name not in CONFIG_NAMES:
        raise ValueError(f"unknown diffusers config {name!r}; known: {', '.join(CONFIG_NAMES)}")
    return resources.files("optimizer.checkpoint") / "configs" / name


def _walk(node, rel: str = ""):
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        child_rel = f"{rel}/{child.name}" if rel else child.name
        if child.is_dir():
            yield from _walk(child, child_rel)
        elif child.name.endswith(".json"):
            yield child_rel, child


def shipped_config(name: str) -> dict[str, dict[str, Any]]:
    """The shipped JSON files of config ``name`` as ``{relative path: parsed JSON}``."""
    return {rel: json.loads(node.read_text(encoding="utf-8")) for rel, node in _walk(_shipped_dir(name))}


@cache
def clip_bpe_files() -> tuple[str, str]:
    """``(vocab.json text, merges.txt text)`` of the CLIP BPE tokenizer (49408 tokens).

    Built from open_clip's ``bpe_simple_vocab_16e6.txt.gz`` exactly as OpenAI's CLIP tokenizer
    builds its vocabulary: the 256 byte characters, the same with ``</w>``, the 48894 merges
    joined, then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != 49408 or len(set(vocab)) != len(vocab):
        raise RuntimeError(f"{bpe}: unexpected CLIP BPE content ({len(vocab)} tokens)")
    vocab_json = json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False)
    merges_txt = "#version: 0.2\n" + "\n".join(merges) + "\n"
    return vocab_json, merges_txt


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    text = str(value)
    if text.startswith("torch."):  # a torch.dtype in a transformers config
        return text.removeprefix("torch.")
    raise TypeError(f"config value {value!r} ({type(value).__name__}) is not JSON-serializable")


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _build_files(
    name: str, overrides: Mapping[str, Mapping[str, Any] | None], extra_files: Mapping[str, str] | None = None
) -> dict[str, str]:
    files = shipped_config(name)
    for arg, override in overrides.items():
        if override is None:
            continue
        rel = _COMPONENT_FILES[arg]
        if rel not in files:
            raise ValueError(f"config {name!r} has no {rel} to override with {arg}")
        clean = {k: v for k, v in _jsonable(override).items() if k not in _IGNORED_OVERRIDE_KEYS}
        files[rel] = {**files[rel], **clean}
    texts = {rel: _dump(obj) for rel, obj in files.items()}
    vocab_json, merges_txt = clip_bpe_files()
    for rel in list(files):
        if rel.endswith("/tokenizer_config.json"):
            folder = rel.rsplit("/", 1)[0]
            texts[f"{folder}/vocab.json"] = vocab_json
            texts[f"{folder}/merges.txt"] = merges_txt
    for rel, text in (extra_files or {}).items():
        if rel in texts or rel.startswith(("/", "..")) or "/../" in rel:
            raise ValueError(f"extra file {rel!r} would replace a shipped file or leave the folder")
        texts[rel] = text
    return texts


def _stamp_of(texts: Mapping[str, str]) -> str:
    digest = hashlib.sha256(_GENERATOR_VERSION.encode())
    for rel in sorted(texts):
        digest.update(rel.encode() + b"\0" + texts[rel].encode() + b"\0")
    return digest.hexdigest()


def _is_current(path: Path, stamp: str) -> bool:
    try:
        return (path / _STAMP).read_text(encoding="utf-8").strip() == stamp
    except OSError:
        return False


def diffusers_config_dir(
    name: str,
    *,
    unet_config: Mapping[str, Any] | None = None,
    vae_config: Mapping[str, Any] | None = None,
    text_encoder_config: Mapping[str, Any] | None = None,
    text_encoder_2_config: Mapping[str, Any] | None = None,
    text_encoder_3_config: Mapping[str, Any] | None = None,
    transformer_config: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str] | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Materialize the offline diffusers config folder ``name`` and return its path.

    ``name`` is one of :data:`CONFIG_NAMES` (a layout's ``diffusers_config``). The folder holds
    ``model_index.json``, ``scheduler/``, ``unet/``, ``vae/``, ``text_encoder/`` (+ ``_2`` for
    SDXL) configs and ``tokenizer/`` (+ ``tokenizer_2/``) with ``vocab.json`` and ``merges.txt``.

    The ``*_config`` overrides (a diffusers ``model.config`` or transformers ``config.to_dict()``)
    are merged over the shipped component config (override keys win, except the bookkeeping keys
    ``_class_name``, ``_name_or_path``, ``_use_default_values``, ``_commit_hash``); this gives a config folder matching models whose configs differ (tiny test
    models, fine-tunes with other settings).

    The folder lives in ``cache_dir`` or ``cache_root() / "configs"``, named ``<name>`` without
    overrides and ``<name>-<12 hex digits of the content hash>`` with them. It is written
    atomically (temp folder + rename) and reused while its content stamp matches; a stale or
    partial folder is replaced. Raises ``ValueError`` for an unknown name or an override for a
    component the config does not have, ``TypeError`` for a non-JSON override value.
    """
    overrides = {
        "unet_config": unet_config,
        "vae_config": vae_config,
        "text_encoder_config": text_encoder_config,
        "text_encoder_2_config": text_encoder_2_config,
        "text_encoder_3_config": text_encoder_3_config,
        "transformer_config": transformer_config,
    }
    texts = _build_files(name, overrides, extra_files)
    stamp = _stamp_of(texts)
    plain = all(v is None for v in overrides.values()) and not extra_files
    folder = name if plain else f"{name}-{stamp[:12]}"
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "configs"
    path = root / folder
    if _is_current(path, stamp):
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.tmp-", dir=root))
    try:
        for rel, text in texts.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        (tmp / _STAMP).write_text(stamp + "\n", encoding="utf-8")
        try:
            os.rename(tmp, path)
        except OSError:
            # the folder exists: written meanwhile by another process, or stale
            if _is_current(path, stamp):
                shutil.rmtree(tmp, ignore_errors=True)
                return path
            trash = Path(tempfile.mkdtemp(prefix=f".{folder}.old-", dir=root))
            os.rename(path, trash / "old")
            os.rename(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
