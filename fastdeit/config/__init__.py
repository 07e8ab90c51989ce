"""What a run is asked to do: the config dataclasses and their checks (schema), the recipes a run
starts from (recipes), config files (files), timm's RandAugment grammar (randaugment)."""
