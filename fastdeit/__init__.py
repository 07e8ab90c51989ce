"""fastdeit: train DeiT students, with distillation through the distillation token, fast.

The Python API (fastdeit/api.py): `config_from`, `train`, `evaluate`, `load`.
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # the API on first use: `import fastdeit` stays light (no torch)
    if name in ("config_from", "train", "evaluate", "load"):
        from fastdeit import api

        return getattr(api, name)
    raise AttributeError(f"module 'fastdeit' has no attribute {name!r}")
