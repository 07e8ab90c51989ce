"""Configs as files: `fastdeit train --config FILE` reads any subset of the config's sections
from TOML, YAML or JSON (a run's own config.json is such a file), and `fastdeit recipe NAME` writes
a whole resolved config as TOML that `--config` reads back unchanged.

The order a run's settings are applied in: recipe < --config file < flags < --set.
"""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path
from typing import Any

from fastdeit.config.schema import TrainConfig
from fastdeit.errors import UserError, clipped, shown

# What a config file may be, checked before it is parsed or quoted: a whole resolved config is
# about 3 KB, three levels deep (section, key, a pair's items) and some 100 values.
MAX_BYTES = 1 << 20
MAX_DEPTH = 8
MAX_VALUES = 10_000  # after YAML's aliases are expanded (an alias bomb shares its nodes until then)


def read_config_file(path: Path) -> dict[str, dict[str, Any]]:
    """The sections a file holds, by its suffix (.toml, .yaml / .yml, else JSON); every fault
    is one line naming the file (and the line, for a syntax error). Bounded before anything reads
    it whole or quotes it: a regular file (a FIFO would hang, /dev/zero never end), at most
    MAX_BYTES, MAX_DEPTH levels, MAX_VALUES values with aliases expanded, no duplicate keys."""
    path = Path(path)
    text = _read_bounded(path)
    try:
        if path.suffix == ".toml":
            data = _toml(text, path)
        elif path.suffix in (".yaml", ".yml"):
            data = _yaml(text, path)
        else:
            data = _json(text, path)
    except RecursionError:
        raise UserError(f"--config {path}: nested too deeply (a config is sections of keys)") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected sections of keys ([data], [model], ... or "
                        f'{{"data": {{...}}}}), got {type(data).__name__}')
    _check_size(data, path)
    for name, values in data.items():
        if not isinstance(values, dict):
            raise UserError(f"--config {path}: {clipped(str(name))} = {shown(values)} is not a section: expected "
                            f"sections of keys ([{clipped(str(name))}] with key = value lines, or "
                            f'{{"{clipped(str(name))}": {{...}}}})')
    return data


def _read_bounded(path: Path) -> str:
    """The file's text, if it is a regular file of at most MAX_BYTES, in UTF-8."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"--config {path}: not a regular file (a folder, FIFO or device): give a TOML, YAML "
                            f"or JSON file")
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror})") from None
    if len(data) > MAX_BYTES:
        raise UserError(f"--config {path}: larger than {MAX_BYTES // 1024} KiB; a config file is a few KB "
                        f"(fastdeit recipe NAME prints a whole one)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--config {path}: not a text file (not UTF-8): give a TOML, YAML or JSON file") from None


def _check_size(data: dict[str, Any], path: Path) -> None:
    """At most MAX_DEPTH levels and MAX_VALUES values, counted as if YAML's aliases were copied
    out (the walk stops at the limit, so a shared structure is never expanded)."""
    todo: list[tuple[Any, int]] = [(data, 0)]
    count = 0
    while todo:
        value, depth = todo.pop()
        count += 1
        if count > MAX_VALUES:
            raise UserError(f"--config {path}: more than {MAX_VALUES:,} values (YAML aliases counted as copies); "
                            f"a config is about a hundred")
        if depth > MAX_DEPTH:
            raise UserError(f"--config {path}: nested more than {MAX_DEPTH} levels; a config is sections of keys")
        if isinstance(value, dict):
            todo += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            todo += [(v, depth + 1) for v in value]


def _unique(pairs: list[tuple[str, Any]], path: Path) -> dict[str, Any]:
    """A JSON object or YAML mapping whose keys are all distinct (a repeated one would
    silently take the last value)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise UserError(f"--config {path}: {shown(key)} appears twice in one section: keep one")
        out[key] = value
    return out


def _json(text: str, path: Path) -> Any:
    try:
        return json.loads(text, object_pairs_hook=lambda pairs: _unique(pairs, path))
    except ValueError as e:
        raise UserError(f"--config {path}: not valid JSON ({e}); a TOML or YAML file needs the .toml or .yaml "
                        f"suffix") from None


def _toml(text: str, path: Path) -> dict[str, Any]:
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise UserError(f"--config {path}: reading TOML needs Python 3.11+ or `pip install tomli` "
                            f"(a JSON file works everywhere)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--config {path}: {e}") from None


def _yaml(text: str, path: Path) -> Any:
    import yaml  # PyYAML: installed with timm, which reads its own args.yaml with it

    class Loader(yaml.SafeLoader):  # plain data only: no tags that build objects; no repeated keys
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            pairs = [(self.construct_object(k, deep=deep), v) for k, v in node.value]
            for key, _ in pairs:
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    raise UserError(f"--config {path}: a key that is not a word or a number, at line "
                                    f"{node.start_mark.line + 1}")
            _unique([(k, None) for k, _ in pairs], path)
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=Loader)  # Loader: SafeLoader, stricter
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"--config {path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None


def apply_config_file(cfg: TrainConfig, path: Path) -> TrainConfig:
    """`cfg` with the file's values over it (each converted and checked as --set values are)."""
    merged = cfg.to_dict()
    for section, values in read_config_file(path).items():
        merged[section] = {**merged.get(section, {}), **values}  # an unknown section is named by from_dict
    try:
        return TrainConfig.from_dict(merged)
    except UserError as e:
        raise UserError(f"--config {path}: {e}") from None


def to_toml(cfg: TrainConfig, header: str = "") -> str:
    """The whole config as TOML, one [section] per config section."""
    lines = [f"# {line}" for line in header.splitlines()]
    for section, values in cfg.to_dict().items():
        lines += ["", f"[{section}]"] + [f"{key} = {_value(v)}" for key, v in values.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else "nan" if math.isnan(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string: JSON's escapes are TOML's
