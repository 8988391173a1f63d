"""Checkpoint schedules: which optimizer steps of a run get a ``checkpoint-STEP`` folder.

A schedule is a string:

* ``every:N`` -- steps N, 2N, 3N, ... (``--checkpoint-every N``);
* ``log:K``   -- K steps log-spaced between 1 and the last step, ``round(T^(i/(K-1)))`` for i = 0..K-1,
  nudged upward where rounding collides so that K distinct steps remain whenever T >= K (early training
  changes fastest, so it gets the denser checkpoints);
* ``steps:1,5,20`` -- exactly these steps;
* ``none`` -- no intermediate checkpoints.

The last step of the run is always included, so every run ends with a checkpoint of its final weights.
"""

from __future__ import annotations

import math

from dynamics.errors import DynamicsError


def parse_schedule(spec: str | None, every: int = 0) -> tuple[str, list[int]]:
    """Check a schedule string (or ``every``) and return ``(kind, numbers)``; raise naming the bad part."""
    if spec is None or spec == "":
        return ("every", [every]) if every > 0 else ("none", [])
    kind, _, arg = spec.partition(":")
    try:
        if kind in ("every", "log") and arg:
            n = int(arg)
            if n < 1:
                raise ValueError
            return kind, [n]
        if kind == "steps" and arg:
            steps = sorted({int(s) for s in arg.split(",") if s.strip()})
            if not steps or steps[0] < 1:
                raise ValueError
            return kind, steps
        if kind == "none" and not arg:
            return kind, []
    except ValueError:
        pass
    raise DynamicsError(f"bad checkpoint schedule {spec!r}: use every:N, log:K, steps:A,B,C or none (N, K >= 1)",
                        field="checkpoint_schedule")


def log_steps(k: int, last: int) -> list[int]:
    """K distinct log-spaced steps in [1, last] (fewer only when last < K), always ending at ``last``."""
    if last < 1:
        return []
    if k <= 1:
        return [last]
    out: list[int] = []
    for i in range(k):
        s = round(math.exp(math.log(last) * i / (k - 1)))
        s = max(s, out[-1] + 1 if out else 1)
        if s > last:
            break
        out.append(s)
    if out[-1] != last:
        out[-1] = last
    return out


def checkpoint_steps(spec: str | None, last: int, every: int = 0) -> list[int]:
    """The sorted checkpoint steps of a run of ``last`` optimizer steps (the last step always included)."""
    kind, nums = parse_schedule(spec, every)
    if kind == "every":
        steps = list(range(nums[0], last + 1, nums[0]))
    elif kind == "log":
        steps = log_steps(nums[0], last)
    elif kind == "steps":
        steps = [s for s in nums if s <= last]
    else:
        steps = []
    return sorted(set(steps) | ({last} if last >= 1 else set()))
