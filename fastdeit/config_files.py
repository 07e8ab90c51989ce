"""Configs as files: `fastdeit train --config FILE` reads any subset of the config's sections
from TOML, YAML or JSON (a run's own config.json is such a file), and `fastdeit recipe NAME` writes
a whole resolved config as TOML that `--config` reads back unchanged.

The order a run's settings are applied in: recipe < --config file < flags < --set.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastdeit.config import TrainConfig
from fastdeit.errors import UserError


def read_config_file(path: Path) -> dict[str, dict[str, Any]]:
    """The sections a file holds, by its suffix (.toml, .yaml / .yml, else JSON); every fault
    is one line naming the file (and the line, for a syntax error)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"--config {path}: not a text file (not UTF-8): give a TOML, YAML or JSON file") from None
    if path.suffix == ".toml":
        data = _toml(text, path)
    elif path.suffix in (".yaml", ".yml"):
        data = _yaml(text, path)
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise UserError(f"--config {path}: not valid JSON ({e}); a TOML or YAML file needs the .toml or .yaml "
                            f"suffix") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected sections of keys ([data], [model], ... or "
                        f'{{"data": {{...}}}}), got {type(data).__name__}')
    for name, values in data.items():
        if not isinstance(values, dict):
            raise UserError(f"--config {path}: {name} = {values!r} is not a section: expected sections of keys "
                            f'([{name}] with key = value lines, or {{"{name}": {{...}}}})')
    return data


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

    try:
        return yaml.safe_load(text)  # plain data only: no tags that build objects
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
