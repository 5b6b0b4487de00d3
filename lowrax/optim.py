"""Kept for code written against lowrax 0.1's README; the home of these names is `lowrax.train.optim`."""

from lowrax.train.optim import OptimizerConfig, learning_rate_schedule, make_optimizer  # noqa: F401
