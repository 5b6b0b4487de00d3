"""Training: the config (`config`), data (`data`, `default_task`), the one pure step and its
objectives (`step`), the optimizer (`optim`), checkpoints (`checkpoints`), the fine-tune behind
`lowrax train` (`trainer`) and finished runs (`runs`)."""
