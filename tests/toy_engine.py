"""A toy serving engine, standing for vLLM, SGLang and the like: it knows nothing of otel-npu. Its
integration is ``toy_engine_otel.py``, the example of ``docs/extending.md``.

Like the real ones, one engine step spans two calls (``execute_model`` runs the model, a later
``sample_tokens`` samples), the work inside is cut in stages by a runner's methods, and requests arrive with
trace headers (``traceparent``) that the engine keeps. Version 2 of this "engine" gained a ``draft`` stage.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

__version__ = "1.4.0"


@dataclasses.dataclass
class Request:
    id: str
    prompt_len: int
    headers: dict[str, str] | None = None
    done: int = 0  # tokens generated


@dataclasses.dataclass
class Batch:
    new: list[Request]
    running: list[Request]
    finished: list[str]

    @property
    def requests(self) -> list[Request]:
        return self.new + self.running


class Runner:
    """The model runner: the stages of a step, each a method."""

    def prepare(self, batch: Batch) -> Any:
        return [r.prompt_len if not r.done else 1 for r in batch.requests]

    def forward(self, inputs: Any) -> Any:
        time.sleep(0.001)  # stands for the model
        return [x * 2 for x in inputs]

    def sample(self, logits: Any) -> Any:
        return [1 for _ in logits]


class Engine:
    def __init__(self) -> None:
        self.runner = Runner()
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.finished: list[str] = []
        self._logits: Any = None

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> Batch:
        batch = Batch(new=self.waiting, running=self.running, finished=self.finished)
        self.running = self.running + self.waiting
        self.waiting, self.finished = [], []
        return batch

    def execute_model(self, batch: Batch) -> None:
        self._logits = self.runner.forward(self.runner.prepare(batch))

    def sample_tokens(self, batch: Batch) -> list[int]:
        tokens = self.runner.sample(self._logits)
        for request in batch.requests:
            request.done += 1
        done = [r for r in self.running if r.done >= 3]
        self.running = [r for r in self.running if r.done < 3]
        self.finished = [r.id for r in done]
        return tokens

    def step(self) -> list[int]:
        batch = self.schedule()
        self.execute_model(batch)
        return self.sample_tokens(batch)
