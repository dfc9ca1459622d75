"""A model file is data, never code: what a stored configuration may build.

A checkpoint (``.pt``) or release (``.safetensors``) carries the run's configuration, and
``ctrl-csc-eval``, :func:`ctrl_csc.load_pretrained` and ``trainer.resume`` build models (and the
evaluation dataset) from it. Handing that configuration to ``hydra.utils.instantiate`` would let a
file name any importable callable as a ``_target_`` (``numpy.savetxt``, ``os.system``, ...), so
objects are built here instead, and only from an allow-list:

* ``model.encoder`` / ``model.decoder``: the encoder / decoder classes of :mod:`ctrl_csc.models`
  (:data:`ENCODERS`, :data:`DECODERS`);
* ``dataset``: :func:`ctrl_csc.data.build_dataset` (:data:`DATASET_BUILDERS`).

Each entry's keyword arguments must be plain data (strings, numbers, booleans, ``None``, lists and
mappings of them) and names of the class's own parameters. Refused anywhere in a stored config:
Hydra's special keys (``_target_`` below the top of an entry, ``_args_``, ``_partial_``,
``_recursive_``, ``_convert_``, any ``_name_``-style key) and ``${...}`` interpolations (refused
before anything is resolved or built). The target is checked as a *string* against the allow-list,
so nothing named by a refused file is ever imported.

A configuration composed by Hydra from the user's own ``conf/`` is resolved first (its
interpolations are the user's) and then passes the same checks; every ``conf/model/*.yaml`` does.
A model class of one's own is admitted from Python with :func:`register_model_class`.
"""

from __future__ import annotations

import inspect
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ctrl_csc.data import build_dataset
from ctrl_csc.engine.checkpoint import CheckpointError
from ctrl_csc.models import (
    ConvDecoder,
    ConvEncoder,
    ConvVAEEncoder,
    CSCDecoder,
    CSCEncoder,
    DCGANDecoder,
    DCGANEncoder,
    ResNetDecoder,
    ResNetEncoder,
)

__all__ = [
    "ENCODERS",
    "DECODERS",
    "DATASET_BUILDERS",
    "UnsafeConfigError",
    "check_stored_config",
    "checked_entry",
    "plain_config",
    "register_model_class",
]


class UnsafeConfigError(CheckpointError):
    """A configuration that would build something other than this project's own classes."""


def _names(*objs: Callable) -> dict[str, Callable]:
    """Both spellings of each target: the public ``ctrl_csc.models.X`` and the defining module."""
    out: dict[str, Callable] = {}
    for obj in objs:
        public = "ctrl_csc.models" if obj.__module__.startswith("ctrl_csc.models") else None
        if obj is build_dataset:
            public = "ctrl_csc.data"
        out[f"{obj.__module__}.{obj.__qualname__}"] = obj
        if public:
            out[f"{public}.{obj.__qualname__}"] = obj
    return out


ENCODERS: dict[str, Callable] = _names(
    CSCEncoder, DCGANEncoder, ResNetEncoder, ConvEncoder, ConvVAEEncoder
)
DECODERS: dict[str, Callable] = _names(CSCDecoder, DCGANDecoder, ResNetDecoder, ConvDecoder)
DATASET_BUILDERS: dict[str, Callable] = _names(build_dataset)


def register_model_class(cls: type, kind: str) -> str:
    """Admit an encoder (``kind="encoder"``) or decoder class of one's own as a ``_target_`` of
    ``model.encoder`` / ``model.decoder``; returns its target name (``module.QualName``)."""
    table = {"encoder": ENCODERS, "decoder": DECODERS}.get(kind)
    if table is None:
        raise ValueError(f"kind must be 'encoder' or 'decoder', got {kind!r}")
    name = f"{cls.__module__}.{cls.__qualname__}"
    table[name] = cls
    return name


_SPECIAL = re.compile(r"^_.*_$")  # Hydra's reserved keys: _target_, _args_, _partial_, ...
_PLAIN = (str, int, float, bool, type(None))


def _refuse(where: str, source: str, what: str) -> UnsafeConfigError:
    why = (
        "A model file is data, never code: only this project's own classes are built from a "
        "stored configuration"
        if not source.startswith("the ")
        else f"Change `{where}`"
    )
    return UnsafeConfigError(f"refusing to build `{where}` from {source}: {what}. {why}")


def plain_config(cfg: Any, source: str | None = None) -> Any:
    """``cfg`` as plain dicts/lists/scalars.

    From a file (``source`` given) interpolations are *not* resolved: a ``${...}`` anywhere is
    refused. A Hydra config of the user's own (``source=None``) is resolved first.
    """
    if isinstance(cfg, DictConfig | ListConfig):
        cfg = OmegaConf.to_container(cfg, resolve=source is None, throw_on_missing=False)
    _check_plain(cfg, "config", source or "the configuration")
    return cfg


def _check_plain(value: Any, where: str, source: str) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise _refuse(where, source, f"key {k!r} is not a string")
            _check_plain(v, f"{where}.{k}", source)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]", source)
    elif not isinstance(value, _PLAIN):
        raise _refuse(where, source, f"a value of type {type(value).__name__} is not plain data")
    elif isinstance(value, str) and "${" in value:
        raise _refuse(where, source, f"the interpolation {value!r} is not resolved from a file")


def _no_special_keys(value: Any, where: str, source: str) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            if _SPECIAL.match(str(k)):
                what = (
                    f"nested `_target_: {v}`" if k == "_target_" else f"the Hydra key `{k}`"
                ) + " is not allowed"
                raise _refuse(f"{where}.{k}", source, what)
            _no_special_keys(v, f"{where}.{k}", source)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _no_special_keys(v, f"{where}[{i}]", source)


def checked_entry(
    entry: Any, allowed: Mapping[str, Callable], where: str, source: str, **extra: Any
) -> tuple[Callable, dict[str, Any]]:
    """``(callable, kwargs)`` of one ``{_target_: ..., **kwargs}`` entry, or an
    :class:`UnsafeConfigError` naming the target, the setting (``where``) and the file.

    ``entry`` must already be plain (see :func:`plain_config`). ``extra`` are keyword arguments
    the caller adds (e.g. ``split``), checked against the signature like the rest.
    """
    if not isinstance(entry, Mapping):
        raise _refuse(where, source, f"expected a mapping with a `_target_`, got {entry!r}")
    target = entry.get("_target_")
    if not isinstance(target, str) or target not in allowed:
        choices = sorted({k for k in allowed if k.count(".") == 2} or allowed)
        raise _refuse(
            f"{where}._target_",
            source,
            f"`_target_: {target}` is not one of the allowed targets ({', '.join(choices)})",
        )
    kwargs = {k: v for k, v in entry.items() if k != "_target_"}
    _no_special_keys(kwargs, where, source)
    kwargs.update(extra)
    fn = allowed[target]
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    unknown = sorted(set(kwargs) - named)
    if unknown and not takes_any:
        raise _refuse(
            where, source, f"{target} takes no argument(s) {unknown} (it takes {sorted(named)})"
        )
    missing = sorted(
        n
        for n, p in params.items()
        if n in named and p.default is inspect.Parameter.empty and n not in kwargs
    )
    if missing:
        raise UnsafeConfigError(f"`{where}` ({target}) in {source} lacks the argument(s) {missing}")
    return fn, kwargs


def check_stored_config(config: Any, source: str) -> dict[str, Any]:
    """Check the whole run configuration a checkpoint or release carries (``source``: its path),
    before any of it is used: plain data without interpolations, and model and dataset entries
    that build only allow-listed targets. Returns it unchanged."""
    if not isinstance(config, Mapping):
        raise UnsafeConfigError(f"{source} carries a configuration that is not a mapping")
    plain_config(config, source)
    model = config.get("model")
    if not isinstance(model, Mapping):
        raise CheckpointError(f"{source} carries no model configuration")
    for part, allowed in (("encoder", ENCODERS), ("decoder", DECODERS)):
        checked_entry(model.get(part), allowed, f"model.{part}", source)
    if "dataset" in config:
        checked_entry(config["dataset"], DATASET_BUILDERS, "dataset", source)
    return dict(config)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def build_models(
    model_cfg: DictConfig | dict,
    device: torch.device | str = "cpu",
    source: str | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(encoder, decoder)`` from a model config (its ``encoder``/``decoder`` entries).

    Only this project's encoder and decoder classes are built, with keyword arguments checked
    against their signatures (:mod:`ctrl_csc.pretrained.guard`). ``source`` names the file a stored
    config came from (a checkpoint or release): its ``${...}`` interpolations are refused instead
    of resolved. Without it the config is the user's own Hydra config and is resolved first.
    """
    where = source or f"the model config (model={_name_of(model_cfg)})"
    cfg = plain_config(model_cfg, source)
    if not isinstance(cfg, dict):
        raise UnsafeConfigError(f"{where}: the model config is not a mapping")
    for part in ("encoder", "decoder"):
        if part not in cfg:
            raise ValueError(f"the model config has no `{part}` entry (model={cfg.get('name')})")
    check_model_settings(cfg)
    built = []
    for part, allowed in (("encoder", ENCODERS), ("decoder", DECODERS)):
        cls, kwargs = checked_entry(cfg[part], allowed, f"model.{part}", where)
        try:
            module = cls(**kwargs)
        except TypeError as e:  # a setting of the wrong type deep inside the class
            raise ValueError(
                f"model.{part} ({cls.__name__}) of {where} cannot be built: {e}; check the "
                f"types of the model.{part} settings"
            ) from None
        built.append(module.to(device))
    return built[0], built[1]


def check_config_against_tensors(
    model_cfg: dict, states: Mapping[str, Mapping[str, torch.Tensor]], source: str
) -> None:
    """Refuse a stored model config that does not build the file's tensors, before a model of
    the config's size exists: the models are built on the ``meta`` device (shapes, no memory)
    and every parameter (and every buffer the file holds, but the power-iteration vectors, whose
    size follows the inputs seen) must have the shape of the file's tensor. A config edited to
    declare wider stages is one :class:`CheckpointError`, not gigabytes allocated."""
    with torch.device("meta"):
        built = build_models(model_cfg, "meta", source=source)
    for part, module in zip(("encoder", "decoder"), built, strict=True):
        stored = states.get(part, {})
        named = [*module.named_parameters(), *module.named_buffers()]
        for name, tensor in named:
            if name.rsplit(".", 1)[-1] == "power_vector":
                continue
            held = stored.get(name)
            if held is None and isinstance(tensor, torch.nn.Parameter):
                raise CheckpointError(
                    f"{source}: its model.{part} config builds {name} of shape "
                    f"{tuple(tensor.shape)}, which the file's tensors do not hold: the stored "
                    "config and the weights disagree (was the file edited?)"
                )
            if held is not None and tuple(held.shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{source}: its model.{part} config builds {name} of shape "
                    f"{tuple(tensor.shape)}, the file's tensor is {tuple(held.shape)}: the "
                    "stored config and the weights disagree (was the file edited?)"
                )


#: Model settings that are sizes (positive integers) and those that are numbers, by key name.
_MODEL_SIZES = frozenset(
    {"in_channels", "out_channels", "channels", "kernel_size", "stride", "n_iter", "image_size",
     "feature_dim", "hidden_channels", "base_channels"}
)  # fmt: skip
_MODEL_NUMBERS = frozenset({"lmbda", "mu", "init_std", "lmbda_relative", "density"})
#: Model settings that are lists of sizes (the csc_ctrl_* configs' stage widths).
_SIZE_LISTS = frozenset({"widths"})


def check_model_settings(cfg: Any, where: str = "model") -> None:
    """A size that is not a positive integer, or a number that is a string, named by its setting
    (``model.encoder.stages.0.out_channels``) before any class sees it."""
    items = list(
        cfg.items() if isinstance(cfg, dict) else enumerate(cfg) if isinstance(cfg, list) else ()
    )
    # a level's own values, then its lists of sizes, then what lies below: a value copied down
    # by an interpolation (model.lmbda into every stage_defaults, model.widths into the stages)
    # is named where the user set it
    items.sort(
        key=lambda kv: 0 if not isinstance(kv[1], dict | list) else 2 - (kv[0] in _SIZE_LISTS)
    )
    for key, value in items:
        name = f"{where}.{key}"
        if key in _SIZE_LISTS and isinstance(value, list):
            for i, size in enumerate(value):
                if not _is_int(size) or size < 1:
                    raise ValueError(
                        f"{name}[{i}] must be a positive integer, got {size!r}; set {name}=[N,...]"
                    )
        elif isinstance(value, dict | list):
            check_model_settings(value, name)
        elif value is None:
            continue
        elif key in _MODEL_SIZES and (not _is_int(value) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}; set {name}=N")
        elif key in _MODEL_NUMBERS and (
            isinstance(value, bool) or not isinstance(value, numbers.Real)
        ):
            if not (key == "lmbda_relative" and isinstance(value, bool)):
                raise ValueError(f"{name} must be a number, got {value!r}")


def _name_of(model_cfg) -> str:
    try:
        return str(model_cfg.get("name"))
    except Exception:  # noqa: BLE001 - only for the message
        return "?"
