"""Reading a run config: YAML file (+ `--set key=value` overrides) -> one checked RunConfig, and back.

Every config is built here, by `from_dict`: the schema's own checks (trainer/config.py), then the
ones that need to know the task (trainer/config_checks.py). Errors name the file and the dotted key.
Imports the stdlib, yaml and those two modules: cheap enough for `sft-launch --help` on any machine.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from trainer import config_checks
from trainer.config import ConfigError, RunConfig


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        shorthand = getattr(tp, "SHORTHAND", None)
        keys = ", ".join(f.name for f in dataclasses.fields(tp))
        return f"a {shorthand} or a mapping {{{keys}}}" if shorthand else f"a mapping {{{keys}}}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check one scalar/list value against its annotation; lists become tuples."""
    origin = typing.get_origin(tp)
    wrong = ConfigError(f"{where}: {key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        listed = [a for a in args if typing.get_origin(a) is tuple]
        if isinstance(value, (list, tuple)) and listed:  # its items' own errors say more than "wrong"
            return _coerce(value, listed[0], key, where)
        for arg in args:
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                pass
        raise wrong
    if dataclasses.is_dataclass(tp):
        shorthand = getattr(tp, "SHORTHAND", None)
        if shorthand and isinstance(value, str):
            value = {shorthand: value}
        if not isinstance(value, dict):
            raise wrong
        return _build(tp, value, where, f"{key}.", name=key)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise wrong
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise wrong
        return tuple(_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]", where) for i, v in enumerate(value))
    if tp is type(None):
        if value is None:
            return None
        raise wrong
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise wrong
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise wrong
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _optional_dataclass(tp: Any) -> Optional[type]:
    """X for an `Optional[X]` annotation whose X is a config dataclass (an optional section)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _build(cls: type, raw: Any, where: str, prefix: str = "", name: str = "") -> Any:
    """`name`: the key of a dataclass inside a list (data.train_file[1]), for its own checks' errors."""
    if not isinstance(raw, dict):
        name = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{where}: {name} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in sorted(raw.keys() - set(names), key=str):
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f" Did you mean '{prefix}{close[0]}'?" if close else f" Known keys: {', '.join(names)}."
        raise ConfigError(f"{where}: unknown key '{prefix}{key}'.{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required section '{prefix}{f.name}'")
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, raw[f.name] if raw[f.name] is not None else {}, where,
                                    f"{prefix}{f.name}.")
        elif _optional_dataclass(tp) is not None:  # an optional section: null (or absent) turns it off
            kwargs[f.name] = None if raw[f.name] is None else _build(_optional_dataclass(tp), raw[f.name], where,
                                                                     f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(raw[f.name], tp, prefix + f.name, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where}: {name + ': ' if name else ''}{err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-5` -> (["optim", "lr"], 3e-5); the value is typed like YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set optim.lr=3e-5")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = dict(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = value
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's last-one-wins would hide a key written twice (often a typo'd section): refuse it."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (first at line {seen[key] + 1}); YAML would keep only "
                                f"the last one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8 text") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{at}: {problem}") from None
    if raw is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (model, data, ...), "
                          f"got {type(raw).__name__}")
    return raw


def from_dict(raw: dict, where: str = "<config>") -> RunConfig:
    """The one way a config is built: typed, each section checked, then checked against its task."""
    cfg = _build(RunConfig, raw, where)
    try:
        config_checks.check(cfg)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file, apply `--set key=value` overrides, resolve relative paths, and build the
    config: exactly one RunConfig, checked.

    Relative data, model and tokenizer paths are taken relative to the config file when they exist
    there, so a config works from any working directory; output_dir stays relative to the caller.
    """
    path = Path(path)
    raw = apply_overrides(read_yaml(path), list(overrides))
    return from_dict(_with_resolved_paths(raw, path.parent), str(path))


# The keys that name a file or folder the run reads (output_dir and data.cache_dir are where it writes).
PATH_KEYS = {"model": ("name_or_path", "tokenizer", "image_processor"),
             "data": ("train_file", "validation_file", "test_file"), "deepspeed": ("config_file",)}


def _resolve(value: Any, base: Path) -> Any:
    """A relative path that exists under `base`, made absolute; anything else as it is (a value of the
    wrong type is left for the checks to refuse)."""
    if isinstance(value, (list, tuple)):  # data.train_file as a training mix: paths, or {path, weight}
        return [{k: _resolve(x, base) if k == "path" else x for k, x in v.items()} if isinstance(v, dict)
                else _resolve(v, base) for v in value]
    if not isinstance(value, str) or value.startswith("pkg:") or Path(value).is_absolute():
        return value
    candidate = base / value
    return str(candidate.resolve()) if candidate.exists() else value


def _with_resolved_paths(raw: dict, base: Path) -> dict:
    """The raw config with PATH_KEYS resolved against `base`, before the one build."""
    raw = dict(raw)
    for section, keys in PATH_KEYS.items():
        if isinstance(raw.get(section), dict):
            raw[section] = {k: _resolve(v, base) if k in keys else v for k, v in raw[section].items()}
    return raw


def resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    """`cfg` with its relative paths that exist under `base` made absolute (a new config, checked)."""
    return from_dict(_with_resolved_paths(to_dict(cfg), base))


def to_dict(cfg: RunConfig) -> dict:
    """Plain dict (lists, not tuples) that `from_dict` reads back into an equal config."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(cfg))
