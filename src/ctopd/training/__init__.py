"""Training: the run configuration, the on-policy loop, the SFT baseline, evaluation and plots.

Import the pieces from their modules (``ctopd.training.loop.train``,
``ctopd.training.sft.run_sft``, ...); this package keeps its import light so ``ctopd --help``
stays fast.
"""

from ctopd.training.config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config"]
