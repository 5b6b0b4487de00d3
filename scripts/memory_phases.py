"""Where a real `lowrax train` run's memory goes: peak resident memory by phase, and the compiled programs.

    .venv-test/bin/python scripts/memory_phases.py [--out phases.json] [CONFIG.yaml] [section.key=value ...]

Runs `lowrax train` with the given preset and overrides in this process while a thread samples the
process's resident memory (RSS, /proc/self/statm) every 10 ms, labelled with the phase the run is in:

    imports            Python, JAX and lowrax imported
    data               records read and checked
    model              the base loaded and its adapters initialised
    tokenizer          the tokenizer (or image processor) built
    other setup        the rest of the command's preparation (the run directory, the mesh)
    objective setup    the data tokenized into batches, evaluation and scoring prepared
    step setup         optimizer state, the step's shardings, the run's files
    scoring before     held-out loss, task metric and samples before training (unless train.quick)
    compile + step 1   the first training step (tracing and compiling it, or loading it from the cache)
    train steps        every later step, with its data preparation
    evaluation         train.eval_every measurements
    checkpoints        orbax saves
    held-out loss      the final held-out loss
    scoring after      the task metric and samples after training (generation)
    writing outputs    adapter, loss curve, summary

For each phase: the highest RSS sampled in it, the RSS at its end and its seconds. For each program
compiled through `jax.jit` (the step, evaluation, generation, ...): XLA's own sizes of its arguments,
outputs, temporaries and generated code (`compiled.memory_analysis()`). The process's peak RSS (the
kernel's `ru_maxrss`) closes the report. Results are printed as a table and written as JSON with --out.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import sys
import threading
import time

START = time.perf_counter()
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PhaseSampler:
    """A thread that keeps, per phase label, the highest RSS seen while the label was current."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.phase, self.started = interval, "imports", time.perf_counter()
        self.records: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _note(self, rss: int) -> None:
        with self.lock:
            record = self.records.setdefault(self.phase, {"peak_rss_mb": 0.0, "seconds": 0.0})
            record["peak_rss_mb"] = max(record["peak_rss_mb"], rss / 2**20)

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.lock:  # a sample belongs to the phase it was taken in
                phase, rss = self.phase, rss_bytes()
                record = self.records.setdefault(phase, {"peak_rss_mb": 0.0, "seconds": 0.0})
                record["peak_rss_mb"] = max(record["peak_rss_mb"], rss / 2**20)
            time.sleep(self.interval)

    def enter(self, phase: str) -> str:
        """Switch to `phase`; returns the one it left."""
        self._note(rss_bytes())
        with self.lock:
            left, now = self.phase, time.perf_counter()
            record = self.records.setdefault(left, {"peak_rss_mb": 0.0, "seconds": 0.0})
            record["seconds"] += now - self.started
            record["end_rss_mb"] = rss_bytes() / 2**20
            self.phase, self.started = phase, now
        self._note(rss_bytes())
        return left

    def finish(self) -> dict:
        self.enter("done")
        self.stop.set()
        self.thread.join()
        return {k: v for k, v in self.records.items() if k != "done"}


SAMPLER = PhaseSampler()


def in_phase(phase: str, fn):
    """fn, run under the label `phase` (the previous label comes back afterwards)."""
    @functools.wraps(fn)
    def labelled(*args, **kwargs):
        left = SAMPLER.enter(phase)
        try:
            return fn(*args, **kwargs)
        finally:
            SAMPLER.enter(left)
    return labelled


PROGRAMS: list[dict] = []


def recording_jit(real_jit):
    """jax.jit that also records, once per argument shapes, the compiled program's memory analysis."""
    import jax

    def jit(fun, *jit_args, **jit_kwargs):
        jitted = real_jit(fun, *jit_args, **jit_kwargs)
        seen: set = set()
        name = getattr(fun, "__name__", type(fun).__name__)

        @functools.wraps(fun)
        def call(*args, **kwargs):
            shapes = tuple((getattr(x, "shape", None), str(getattr(x, "dtype", ""))) for x in jax.tree.leaves((args, kwargs)))
            if shapes not in seen:
                seen.add(shapes)
                try:
                    analysis = jitted.lower(*args, **kwargs).compile().memory_analysis()
                    PROGRAMS.append({"program": name, "phase": SAMPLER.phase,
                                     **{k: getattr(analysis, f"{k}_size_in_bytes") / 2**20 for k in
                                        ("argument", "output", "temp", "generated_code")}})
                except Exception as e:  # a program that cannot be lowered alone: say so, keep running
                    PROGRAMS.append({"program": name, "phase": SAMPLER.phase, "error": str(e).splitlines()[0][:120]})
            return jitted(*args, **kwargs)

        call.lower = jitted.lower
        return call

    return jit


def instrument() -> None:
    """Label the run's phases by wrapping the trainer's methods (diagnostics only; nothing else changes)."""
    import jax

    jax.jit = recording_jit(jax.jit)
    from lowrax.train import trainer

    trainer.load_records = in_phase("data", trainer.load_records)
    trainer.build_model = in_phase("model", trainer.build_model)
    trainer.load_preprocessor = in_phase("tokenizer", trainer.load_preprocessor)
    trainer.objective_run = in_phase("objective setup", trainer.objective_run)
    run = trainer.TrainingRun
    original_init = run.__init__

    def init(self, ctx, objective, out):
        in_phase("step setup", original_init)(self, ctx, objective, out)
        step, calls = self.step_fn, []

        def labelled_step(*args):  # a step's phase lasts until the next step begins (its execution is async)
            SAMPLER.enter("train steps" if calls else "compile + step 1")
            calls.append(1)
            return step(*args)

        self.step_fn = labelled_step
        o = self.objective
        for field, phase in (("score_start", "scoring before"), ("evaluate", "evaluation"),
                             ("final_metrics", "held-out loss"), ("score_final", "scoring after")):
            setattr(o, field, in_phase(phase, getattr(o, field)))

    run.__init__ = init
    run.save = in_phase("checkpoints", run.save)
    original_finish = run.finish

    def finish(self, started):
        SAMPLER.enter("writing outputs")  # held-out loss and scoring after are labelled inside
        return original_finish(self, started)

    run.finish = finish


def main() -> None:
    items = sys.argv[1:]
    out = None
    if "--out" in items:
        i = items.index("--out")
        out = items[i + 1]
        del items[i:i + 2]
    from lowrax.cli.main import main as lowrax_main

    instrument()
    SAMPLER.enter("other setup")
    code = lowrax_main(["train", *items])
    phases = SAMPLER.finish()
    from bench_common import machine_facts
    from performance_tables import phases_table

    report = {"command": "lowrax train " + " ".join(items), "exit": code, "phases": phases, "programs": PROGRAMS,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "wall_s": time.perf_counter() - START, "machine": machine_facts()}
    print("\n" + phases_table(report))
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    sys.exit(code)


if __name__ == "__main__":
    from lowrax.train.host_memory import relaunch_with_huge_pages

    relaunch_with_huge_pages()  # the malloc `lowrax train` runs with
    main()
