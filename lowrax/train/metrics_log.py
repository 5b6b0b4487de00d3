"""A run's metrics.jsonl and its loss curve (loss.png)."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """metrics.jsonl: one JSON line per step or evaluation, written by process 0 only."""

    def __init__(self, path: Path, primary: bool):
        self.path, self.primary = path, primary

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def truncate(self, step: int) -> None:
        """Keep the lines up to `step` (0: none)."""
        if self.primary:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows() if 0 < r.get("step", 0) <= step))

    def write(self, row: dict) -> None:
        if self.primary:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def plot_losses(rows: list[dict], path: Path) -> None:
    """The loss curve (log scale while every loss is positive), with the held-out loss and, for RL runs,
    the rollouts' mean reward on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if r.get("loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in trained], [r["loss"] for r in trained], label="train loss")
    evals = [r for r in rows if r.get("eval_loss") is not None]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(r["loss"] > 0 for r in trained) and all(r["eval_loss"] > 0 for r in evals):
        ax.set_yscale("log")
    ax.legend(loc="upper left")
    rewarded = [r for r in rows if r.get("reward") is not None]
    if rewarded:
        twin = ax.twinx()
        twin.plot([r["step"] for r in rewarded], [r["reward"] for r in rewarded], color="tab:green", alpha=0.7,
                  label="reward (rollouts)")
        twin.set_ylabel("reward")
        twin.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
