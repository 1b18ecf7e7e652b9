"""The backend half Triton's table requires; under ``TRITON_INTERPRET=1`` Triton never asks it to compile."""

from __future__ import annotations

from typing import Any

from triton.backends.compiler import BaseBackend, GPUTarget

_INTERPRETED = "kernels run in Triton's interpreter here: set TRITON_INTERPRET=1"


class InterpreterBackend(BaseBackend):
    @staticmethod
    def supports_target(target: GPUTarget) -> bool:
        return target.backend == "cpu"

    def hash(self) -> str:
        return "triton-cpu-interpreter"

    def parse_options(self, options: dict) -> object:
        raise RuntimeError(_INTERPRETED)

    def add_stages(self, stages: dict, options: object, *args: Any) -> None:
        raise RuntimeError(_INTERPRETED)

    def load_dialects(self, context: Any) -> None:
        pass

    def get_module_map(self) -> dict:
        return {}
