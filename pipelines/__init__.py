"""Pipelines that execute an augmentation plan (installed as fastdeit.pipelines)."""
