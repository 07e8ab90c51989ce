"""Fused kernels (installed as fastdeit.kernels)."""
