"""Trainer-shaped load: N ranks that each send a burst of B images at the same moment every step.

A DDPO/GRPO step on N data-parallel ranks samples images (the GPU busy, the reward service idle),
then every rank sends its B images to the reward service at once, and the next step starts after
the sampling time. Mapped onto Locust:

- one Locust user = one trainer rank; :meth:`TrainerStepShape.tick` asks for ``--trainer-ranks``
  users, all spawned during ``--trainer-lead-s`` before step 0, and returns None (the run stops)
  one period after the last of ``--trainer-steps`` steps;
- the step grid is one :class:`~loadtest.locust.steps.StepSchedule`: step k fires at
  ``first_step + k * --trainer-step-s`` (Unix time). The shape makes it on its first tick and
  publishes it (a master sends it to its workers);
- each user waits with a ``wait_time`` that sleeps until the next boundary of the grid (and its
  ``on_start`` until step 0), so all ranks fire together; a burst is one request of
  ``--images-per-request`` images (``/v1/score`` or a group, or one gRPC ``score`` call);
- a burst slower than the period makes its rank skip to the next boundary (logged as missed
  steps), where a synchronous trainer would fall behind instead: the service did not keep up.

Use it as a second Locust file (it defines no users)::

    locust -f loadtest/locust/locustfile.py,loadtest/locust/shapes.py --headless \
        --host URL RestScoreUser --trainer-ranks 8 --images-per-request 16 --trainer-step-s 10

``--users``/``--spawn-rate``/``--run-time`` are ignored: the shape decides.
"""

from __future__ import annotations

import time
from typing import Any

from locust import LoadTestShape, events

from loadtest.locust import options, steps


class TrainerStepShape(LoadTestShape):
    def __init__(self) -> None:
        super().__init__()
        self.schedule: steps.StepSchedule | None = None
        # a stopped test forgets its grid, so the next one (web UI) makes a new one; not in
        # reset_time(): a master calls that after the first tick
        events.test_stop.add_listener(self._forget)

    def _forget(self, **_: Any) -> None:
        self.schedule = None
        steps.publish(None)

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        opts = options.get(self.runner.environment)
        if self.schedule is None:
            if opts.trainer_ranks < 1 or opts.trainer_steps < 1 or opts.trainer_step_s <= 0:
                raise ValueError("trainer shape: ranks and steps ≥ 1, step period > 0")
            self.schedule = steps.StepSchedule(
                first_step=time.time() + opts.trainer_lead_s,
                period_s=opts.trainer_step_s,
                steps=opts.trainer_steps,
            )
            steps.publish(self.schedule, self.runner)
        if time.time() >= self.schedule.end:
            self._forget()
            return None
        # every rank spawned within half the lead, so all of them wait for step 0
        return opts.trainer_ranks, opts.trainer_ranks / max(opts.trainer_lead_s / 2, 0.01)
