"""The Locust users: a trainer calling the gateway over REST, and one calling Triton over gRPC.

- :class:`RestScoreUser` (``HttpUser``): ``POST /v1/score`` with B images of one prompt per
  request (``--rest-endpoint group``: ``POST /v1/score/group`` with advantages), Bearer key from
  ``--api-key``; a non-200 answer or a wrong number of results is a failure.
- :class:`TritonGrpcUser` (``User`` + ``tritonclient.grpc``): one ``score`` inference with B
  images and, per image, the token ids of [prompt, contrastive prompts]; every call is reported
  through ``events.request`` (type ``grpc``) so it lands in Locust's statistics.

Both are closed loops (no wait) unless a trainer schedule is active (``shapes``): then each user
is one rank and fires once per step boundary. Payloads are built when Locust initialises, once
per process (a master renders nothing). gRPC under gevent needs ``init_gevent()`` before the
first channel: it is called when this module is imported.
"""

from __future__ import annotations

import itertools
import logging
import time
from functools import cache
from pathlib import Path
from typing import Any

import gevent
import grpc.experimental.gevent as grpc_gevent
import numpy as np
import tritonclient.grpc as grpcclient
from locust import HttpUser, User, events, task
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import MasterRunner
from textnorm_reward_client.clip_tokenizer import ClipTokenizer

from loadtest.locust import finalcsv, options, payloads, requestlog, steps  # noqa: F401 (listeners)
from service.contrastive import NoContrastivePrompts, contrastive_prompts
from service.model_contract import MAX_PROMPTS

grpc_gevent.init_gevent()

logger = logging.getLogger(__name__)
ENSEMBLE_LAMBDA = 1.0  # the service's default λ
GRPC_TIMEOUT_S = 120.0
_ranks = itertools.count()


@events.test_start.add_listener
def _reset_ranks(**_: Any) -> None:
    global _ranks
    _ranks = itertools.count()


@events.init.add_listener
def _prepare(environment: Environment, **_: Any) -> None:
    """Render and encode every payload before the first user spawns."""
    if isinstance(environment.runner, MasterRunner):
        return
    opts = options.get(environment)
    payloads.build(opts.prompt_pool, opts.images_per_request, opts.image_size)
    if any(issubclass(cls, TritonGrpcUser) for cls in environment.user_classes):
        _grpc_inputs(
            opts.tokenizer,
            opts.prompt_pool,
            opts.images_per_request,
            opts.image_size,
            opts.textnorm_scale,
        )
    # gevent's clock is cached per loop iteration and the work above did not run the loop: an
    # unrefreshed clock would start `--run-time`'s timer that many seconds in the past
    gevent.get_hub().loop.update_now()


class RewardUser(User):
    """What both users share: rank, payload choice, and the trainer step alignment."""

    abstract = True

    def on_start(self) -> None:
        self.opts = options.get(self.environment)
        self.rank = next(_ranks)
        self.images = self.opts.images_per_request
        self.payloads = payloads.build(self.opts.prompt_pool, self.images, self.opts.image_size)
        self._sent = 0
        self._step: int | None = None
        self._step_time: float | None = None
        schedule = steps.current()
        if schedule is not None:
            gevent.sleep(self._until_next_step(schedule))

    def wait_time(self) -> float:
        schedule = steps.current()
        return 0.0 if schedule is None else self._until_next_step(schedule)

    @staticmethod
    def _until_next_step(schedule: steps.StepSchedule) -> float:
        now = time.time()
        step = schedule.next_step(now)
        if step is None:  # every step has fired: wait to be stopped
            return max(schedule.end - now, 0.0) + 3600.0
        return schedule.time_of(step) - now

    def _next_payload(self) -> int:
        """Index of the payload to send: round robin, or (rank + step) in a trainer run."""
        schedule = steps.current()
        if schedule is None:
            index = self.rank + self._sent
        else:
            step = schedule.step_at(time.time())
            expected = 0 if self._step is None else self._step + 1
            if step > expected:
                logger.warning("rank %d missed steps %d..%d", self.rank, expected, step - 1)
            self._step, self._step_time = step, schedule.time_of(step)
            index = self.rank + step
        self._sent += 1
        return index % len(self.payloads)

    def context(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "step": self._step,
            "step_time": self._step_time,
            "images": self.images,
        }


class RestScoreUser(RewardUser, HttpUser):
    """A trainer rank calling the gateway: B images of one prompt per request."""

    def on_start(self) -> None:
        super().on_start()
        self.path = options.REST_ENDPOINTS[self.opts.rest_endpoint]
        self.headers = {"Content-Type": "application/json"}
        if self.opts.api_key:
            self.headers["Authorization"] = f"Bearer {self.opts.api_key}"

    @task
    def score(self) -> None:
        payload = self.payloads[self._next_payload()]
        body = payload.score_body if self.opts.rest_endpoint == "score" else payload.group_body
        name = f"{self.path} [{self.images} img]"
        with self.client.post(
            self.path, data=body, headers=self.headers, name=name, catch_response=True
        ) as response:
            if response.status_code == 0:  # no HTTP answer: connection refused, reset, timeout
                response.failure(f"no response: {response.error!r}")
                return
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            results = response.json().get("results", [])
            if len(results) != self.images:
                response.failure(f"{len(results)} results for {self.images} images")
            else:
                response.success()


@cache
def _grpc_inputs(
    tokenizer_file: str, prompts: int, images: int, size: int, scale: float
) -> tuple[list[grpcclient.InferInput], ...]:
    """Per payload, the `score` model's inputs, serialised once."""
    tokenizer = ClipTokenizer(Path(tokenizer_file))
    out = []
    for payload in payloads.build(prompts, images, size):
        try:
            contrastive = contrastive_prompts(payload.prompt, "auto")
        except NoContrastivePrompts:
            contrastive = []
        texts = [payload.prompt, *contrastive][:MAX_PROMPTS]
        ids = np.zeros((MAX_PROMPTS, tokenizer.context_length), np.int64)
        ids[: len(texts)] = tokenizer.encode(texts).ids
        mask = np.zeros(MAX_PROMPTS, bool)
        mask[: len(texts)] = True
        arrays = {
            "IMAGE": (payload.pixels, "UINT8"),
            "INPUT_IDS": (np.repeat(ids[None], images, axis=0), "INT64"),
            "PROMPT_MASK": (np.repeat(mask[None], images, axis=0), "BOOL"),
            "TEXTNORM_SCALE": (np.full((images, 1), scale, np.float32), "FP32"),
            "ENSEMBLE_LAMBDA": (np.full((images, 1), ENSEMBLE_LAMBDA, np.float32), "FP32"),
        }
        inputs = []
        for name, (value, dtype) in arrays.items():
            tensor = grpcclient.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        out.append(inputs)
    return tuple(out)


class TritonGrpcUser(RewardUser):
    """A trainer rank calling Triton's `score` model directly (KServe v2 gRPC)."""

    def on_start(self) -> None:
        opts = options.get(self.environment)
        if not opts.triton_grpc:
            logger.error("TritonGrpcUser needs --triton-grpc HOST:PORT")
            raise StopUser
        self.inputs = _grpc_inputs(
            opts.tokenizer,
            opts.prompt_pool,
            opts.images_per_request,
            opts.image_size,
            opts.textnorm_scale,
        )
        self.outputs = [grpcclient.InferRequestedOutput("TEXTNORM")]
        self.grpc = grpcclient.InferenceServerClient(opts.triton_grpc)
        self.request_name = f"score [{opts.images_per_request} img]"
        super().on_start()

    def on_stop(self) -> None:
        if hasattr(self, "grpc"):
            self.grpc.close()

    @task
    def score(self) -> None:
        inputs = self.inputs[self._next_payload()]
        start_time, start = time.time(), time.perf_counter()
        length, error = 0, None
        try:
            result = self.grpc.infer(
                "score", inputs, outputs=self.outputs, client_timeout=GRPC_TIMEOUT_S
            )
            textnorm = result.as_numpy("TEXTNORM")
            if textnorm is None or textnorm.shape[0] != self.images:
                raise ValueError(f"TEXTNORM {None if textnorm is None else textnorm.shape}")
            length = result.get_response().ByteSize()
        except Exception as exc:  # every failure is a failed request in Locust's statistics
            error = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name=self.request_name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            response=None,
            context=self.context(),
            exception=error,
            start_time=start_time,
            url=self.opts.triton_grpc,
        )
