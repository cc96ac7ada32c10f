"""Setting config fields by their dotted names, the same way from every place a user writes them:
the command line (``--lalm.answers_per_clip 5``), a YAML file (``lalm: {answers_per_clip: 5}``)
and a Tune trial (``{"lalm.answers_per_clip": 5}``). Values are coerced to the field's type and
every choice field is checked against its ``Literal``; ``--help`` shows each field once, with the
comment that documents it in ``config.py`` (``field_help``).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import tokenize
import typing
from functools import lru_cache
from typing import Any, Literal

import yaml

from .config import ConfigError, MiFuseConfig, _field_types, validate

def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if origin is Literal:                       # every choice field is checked here, and only here
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is typing.Union or (origin is not None and type(None) in args):
        inner = [a for a in args if a is not type(None)]
        if isinstance(value, str) and value.lower() in ("none", "null", ""):
            return None
        return _coerce(value, inner[0], key)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return bool(value)
    if tp in (int, float):
        try:
            result = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return result
    if tp is str:
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        items = [_coerce(v, args[0], key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        return dict(value)
    return value


def _set_path(cfg: Any, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    obj = cfg
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(f"unknown config key {dotted!r}")
        obj = getattr(obj, part)
    name = parts[-1]
    if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
        raise ConfigError(f"unknown config key {dotted!r}")
    tp = _field_types(type(obj))[name]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted}: expected a mapping")
        for k, v in value.items():
            _set_path(cfg, f"{dotted}.{k}", v)
        return
    setattr(obj, name, _coerce(value, tp, dotted))


def apply_overrides(cfg: MiFuseConfig, overrides: dict[str, Any]) -> MiFuseConfig:
    """Apply {dotted.key: value} (from CLI, YAML or a Tune trial) in place and validate."""
    for key, value in overrides.items():
        _set_path(cfg, key, value)
    validate(cfg)
    return cfg


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("synonyms",):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return flatten(data)


@lru_cache(maxsize=None)
def field_help(cls) -> dict[str, str]:
    """{field: its documentation} for a config dataclass: the comment on the field's line, after the
    comment lines right above it. The comments in ``config.py`` are the one place a field is documented."""
    source = inspect.getsource(cls)
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    above: list[str] = []
    for number, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(comments[number])
            continue
        name = stripped.split(":", 1)[0] if line.startswith("    ") and not line.startswith("     ") else None
        if name in names:
            out[name] = " ".join(above + ([comments[number]] if number in comments else []))
        above = [] if not line.startswith("     ") else above      # a continuation line keeps them
    return out


def _help(cls, name: str, tp, default) -> str:
    text = field_help(cls).get(name, "")
    choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else ()
    shown = f"one of {', '.join(map(str, choices))}; " if choices else ""
    return f"{text} ({shown}default: {default!r})".replace("%", "%%")


def _metavar(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "CHOICE"
    return getattr(tp, "__name__", "VALUE").upper()


def add_config_arguments(parser: argparse.ArgumentParser, cls=MiFuseConfig, prefix: str = "",
                         group=None) -> None:
    """One ``--dotted.name`` option per config field, all defaulting to 'not given', grouped by
    section (the section's docstring heads its group) and each with its documentation."""
    group = group or parser.add_argument_group("run", (cls.__doc__ or "").strip().splitlines()[0])
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            title = (tp.__doc__ or "").strip().splitlines()[0]
            add_config_arguments(parser, tp, f"{prefix}{f.name}.", parser.add_argument_group(f"{prefix}{f.name}", title))
        else:
            flag = dict(nargs="?", const="true") if tp is bool else {}     # `--verbose` alone means true
            group.add_argument(f"--{prefix}{f.name}", dest=f"cfg:{prefix}{f.name}", default=None,
                               metavar=_metavar(tp),
                               help=_help(cls, f.name, tp, getattr(defaults, f.name)), **flag)


def config_from_args(args: argparse.Namespace, base: MiFuseConfig | None = None) -> MiFuseConfig:
    """Defaults, then the YAML file (``--config``), then ``--dotted.key`` options."""
    cfg = base or MiFuseConfig()
    overrides: dict[str, Any] = {}
    if getattr(args, "config", None):
        overrides.update(load_yaml(args.config))
    overrides.update({k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None})
    return apply_overrides(cfg, overrides)
