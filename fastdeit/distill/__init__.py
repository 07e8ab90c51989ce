"""Distillation: the loss (loss), where the teacher's targets come from (sources: live, replayed, label
maps, and the registry of target kinds), the on-disk teacher cache (cache_format) and the cache-
teacher command that builds it (cache_build)."""
