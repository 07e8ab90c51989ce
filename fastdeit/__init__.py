"""fastdeit: train DeiT students, with distillation through the distillation token, fast."""

__version__ = "0.1.0"
