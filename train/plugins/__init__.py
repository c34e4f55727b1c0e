"""Training extensions, auto-discovered: each module here defines
``extension(cfg: TrainConfig) -> train.extensions.Extension | None`` (None when its config
section does not enable it). See :mod:`train.extensions`."""
