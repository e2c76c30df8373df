"""Timing train steps side by side, for the step benchmarks (``pair_lists.py``, ``step_profile.py``).

The settings take turns, one pass over their batches each per round, so that a shared machine's
drift falls on all of them alike; each setting's figure is its best pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax

Step = Callable[[Any, Any], tuple[Any, Any]]


def run_pass(step: Step, state: Any, batches: Sequence[Any]) -> Any:
    """``state`` after one step on each of ``batches``, waited for (the first pass compiles every shape class)."""
    sums = None
    for b in batches:
        state, sums = step(state, b)
    jax.block_until_ready(sums)
    return state


def best_pass_seconds(runs: dict[Hashable, tuple[Step, Any, Sequence[Any]]], rounds: int) -> dict[Hashable, float]:
    """Best seconds of a pass over its batches, per setting ``(step, state, batches)``, over ``rounds``
    rounds in which the settings take turns."""
    states = {key: state for key, (_, state, _) in runs.items()}
    times: dict[Hashable, list[float]] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, (step, _, batches) in runs.items():
            start = time.perf_counter()
            states[key] = run_pass(step, states[key], batches)
            times[key].append(time.perf_counter() - start)
    return {key: min(values) for key, values in times.items()}
