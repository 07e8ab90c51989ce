"""Data: ImageFolder indexing (folder, stored_index), the prepared format (prepared) and the
prepare-data command (preparing), the embedded synthetic set (synthetic), the augmentation plan
(plan) and the loaders that execute it (loaders; the pipelines live in pipelines/)."""
