"""Kept for code written against lowrax 0.1's README; the home of these names is `lowrax.train.step`."""

from lowrax.train.step import TrainState, causal_lm_loss, classification_loss, init_state, make_train_step  # noqa: F401
