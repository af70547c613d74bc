"""Step times of a timed run: tokens/s at the median step and how much the steps wandered."""

from __future__ import annotations

import statistics


def step_spread(per_step: list[tuple[float, float]]) -> dict:
    """Each timed step's seconds, tokens/s at the median step, and the spread of the step times: a shared
    machine sometimes slows a stretch of steps (seen on H200 hosts: 120 ms steps turning 170 ms for a dozen
    steps); the median shows the code's own speed, the mean (tokens_per_second, the headline) what the run got."""
    seconds = [s for _, s in per_step]
    return {"step_seconds": [round(s, 5) for s in seconds],
            "median_step_tokens_per_second": statistics.median(tokens / s for tokens, s in per_step),
            "step_spread": spread(seconds)}


def spread(seconds: list[float]) -> float:
    """The 90th-percentile step time over the 10th: how much a run's steps wandered, robust to one slow step."""
    if len(seconds) < 2:
        return 1.0
    deciles = statistics.quantiles(seconds, n=10, method="inclusive")
    return deciles[-1] / deciles[0]
