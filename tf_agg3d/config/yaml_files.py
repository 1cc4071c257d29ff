"""Config files: loading YAML with ``base:`` inheritance and ``key=value`` overrides, and saving."""

from __future__ import annotations

import os
import posixpath
from typing import Any

import yaml

from tf_agg3d.config.checks import check_consistency, check_stages
from tf_agg3d.config.errors import ConfigError
from tf_agg3d.config.plain_data import from_dict, to_dict
from tf_agg3d.config.schema import ExperimentConfig


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses ``a.b.c=value`` (value in YAML syntax) into (["a","b","c"], value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err})") from None
    return key.split("."), value


def load_config(
    path: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: ExperimentConfig | None = None,
) -> ExperimentConfig:
    """Loads an :class:`ExperimentConfig` from defaults, a YAML file and key=value overrides.

    Inheritance: a file may name another with a top-level ``base: other.yaml`` (a path relative
    to the naming file's folder, or absolute, or a URL) and then holds only its difference.
    The base is loaded first (its own ``base`` too: chains are allowed, cycles are refused),
    then the file is merged over it: mappings merge key by key, any other value (a list
    included) replaces the base's whole. Each file of a chain is checked for unknown keys and
    wrong types, and an error names that file.

    Order, later wins: the defaults (or `base`), the chain's root file ... the file itself, then
    the overrides.

    Args:
      path: YAML file (local path or any `tf.io.gfile` URL), or None for the defaults.
      overrides: strings such as ``"data.batch_size=4"`` or ``"model.anchors.sizes=[[5,10]]"``.
      base: the config the file and overrides apply to (default: the defaults), e.g. a
        trained model's config.yaml.

    Raises:
      ConfigError: a file that cannot be read or parsed, an unknown key, a wrong type, a
        ``base`` cycle (naming the files), a bad value of ``train.stages``.
    """
    data: dict = to_dict(base) if base is not None else {}
    if path:
        data = _merge(data, _load_file_chain(path, ()))
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        data = _merge(data, nested)
    where = f"{path}: " if path else ""
    try:
        config = from_dict(ExperimentConfig, data)
        check_consistency(config)
        check_stages(config.train.stages)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None
    return config


# The top-level key naming a file's base config (not a config field).
BASE_KEY = "base"


def _load_yaml_mapping(path: str) -> dict:
    try:
        loaded = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return loaded


def _resolve_base(path: str, ref: str) -> str:
    """`ref` (a ``base:`` value) as a path: relative to the folder of the file `path`."""
    if "://" in ref or os.path.isabs(ref):
        return ref
    if "://" in path:
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), ref))}"
    return os.path.normpath(os.path.join(os.path.dirname(path), ref))


def _chain_key(path: str) -> str:
    return path if "://" in path else os.path.realpath(path)


def _load_file_chain(path: str, chain: tuple[str, ...]) -> dict:
    """The plain data of `path` merged over its ``base`` chain (see :func:`load_config`).

    Args:
      path: the file.
      chain: the files that named this one as their base, outermost first (cycle check).
    """
    if _chain_key(path) in {_chain_key(p) for p in chain}:
        names = " -> ".join((*chain, path))
        raise ConfigError(f"config base cycle: {names} (a file cannot be its own base)")
    loaded = _load_yaml_mapping(path)
    data: dict = {}
    if BASE_KEY in loaded:
        ref = loaded.pop(BASE_KEY)
        if not isinstance(ref, str) or not ref.strip():
            raise ConfigError(f"{path}: {BASE_KEY}: expected a config file name, got {ref!r}")
        data = _load_file_chain(_resolve_base(path, ref.strip()), (*chain, path))
    data = _merge(data, loaded)
    try:
        from_dict(ExperimentConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return data


def _read_text(path: str) -> str:
    if "://" in path:
        import tensorflow as tf

        try:
            with tf.io.gfile.GFile(path, "r") as f:
                return f.read()
        except tf.errors.OpError as err:
            raise ConfigError(f"{path}: cannot read config ({err.message})") from None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None


def save_config(config: ExperimentConfig, path: str) -> None:
    """Writes the config as YAML, atomically (temp file + rename)."""
    from tf_agg3d.utils.atomic_write import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
