"""The trainer step schedule, shared by :class:`~loadtest.locust.shapes.TrainerStepShape` and the
users: step k of the run fires at ``first_step + k * period_s`` (Unix time, so every process of a
distributed run agrees; the master sends the schedule to its workers as a custom message).

No schedule (the module state is None) means a plain closed-loop run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from locust import events
from locust.env import Environment
from locust.runners import MasterRunner, Runner, WorkerRunner

MESSAGE = "reward_trainer_schedule"


@dataclass(frozen=True)
class StepSchedule:
    first_step: float  # Unix time of step 0
    period_s: float
    steps: int

    @property
    def end(self) -> float:
        """One period after the last step: the last burst's time to complete."""
        return self.first_step + self.steps * self.period_s

    def time_of(self, step: int) -> float:
        return self.first_step + step * self.period_s

    def next_step(self, now: float) -> int | None:
        """The first step at or after `now`; None when every step has fired."""
        step = max(0, math.ceil((now - self.first_step) / self.period_s))
        return step if step < self.steps else None

    def step_at(self, now: float) -> int:
        """The step whose boundary is nearest to `now` (a rank reads it just after waking)."""
        return round((now - self.first_step) / self.period_s)


_current: StepSchedule | None = None


def current() -> StepSchedule | None:
    return _current


def publish(schedule: StepSchedule | None, runner: Runner | None = None) -> None:
    """Make `schedule` this process's schedule and, on a master, every worker's."""
    global _current
    _current = schedule
    if isinstance(runner, MasterRunner) and schedule is not None:
        runner.send_message(MESSAGE, asdict(schedule))


def _on_message(msg: Any, **_: Any) -> None:
    publish(StepSchedule(**msg.data))


@events.init.add_listener
def _register(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        environment.runner.register_message(MESSAGE, _on_message)
