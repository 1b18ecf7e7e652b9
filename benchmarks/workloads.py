"""Decode-like serving loops to instrument: a synthetic one (matmuls sized to ≈ 5 ms per step) and a real
small Llama model from Hugging Face transformers (random weights, KV cache, greedy), when installed.

Each step has the four stages vllm-ascend instrumented — "prepare input", "forward", "post process",
"sample" — and ``run(steps, stage, step, after_step)`` takes the timing method as arguments, so every
variant times exactly the same work.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import torch

from .alternatives import Device

NULL = contextlib.nullcontext()


def no_timer(name: str, **_: Any) -> Any:
    return NULL


class SyntheticDecode:
    """A stand-in for a decode step: an MLP stack over a batch of 8 tokens, ≈ ``target_ms`` per step."""

    tokens_per_step = 8

    def __init__(self, device: Device, target_ms: float = 5.0, hidden: int = 1024) -> None:
        self.device = device
        d = device.torch_device
        torch.manual_seed(0)
        self.hidden = hidden
        self.x = torch.randn(self.tokens_per_step, hidden, device=d)
        self.pos = torch.randn(self.tokens_per_step, hidden, device=d)
        self.w_out = torch.randn(hidden, 4096, device=d) / hidden ** 0.5
        self.layers = 1
        self.w = [torch.randn(hidden, hidden, device=d) / hidden ** 0.5]
        per_layer = self._time_forward()
        self.layers = max(1, int(round(target_ms / max(per_layer, 1e-3))))
        self.w = [torch.randn(hidden, hidden, device=d) / hidden ** 0.5 for _ in range(self.layers)]

    def _time_forward(self) -> float:
        for _ in range(3):
            self._forward(self.x)
        self.device.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            self._forward(self.x)
        self.device.synchronize()
        return (time.perf_counter() - t0) / 20 * 1e3

    def _forward(self, h: torch.Tensor) -> torch.Tensor:
        for w in self.w:
            h = torch.relu(h @ w)
        return h

    def run(self, steps: int, stage: Callable[..., Any], step: Callable[..., Any],
            after_step: Callable[[], Any] | None = None) -> float:
        """Run ``steps`` steps; return tokens per second (the device is synchronized at the end)."""
        self.device.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            with step("Decode"):
                with stage("prepare input"):
                    h = self.x + self.pos
                with stage("forward"):
                    h = self._forward(h)
                with stage("post process"):
                    probs = torch.softmax(h @ self.w_out, dim=-1)
                with stage("sample"):
                    self.x[:, 0] = torch.argmax(probs, dim=-1).to(self.x.dtype)
            if after_step is not None:
                after_step()
        self.device.synchronize()
        return steps * self.tokens_per_step / (time.perf_counter() - t0)


class LlamaDecode:
    """A real model: transformers' Llama with a small config and random weights, KV-cached greedy decode."""

    def __init__(self, device: Device, batch: int = 4, layers: int = 4, hidden: int = 256, vocab: int = 4096,
                 prompt: int = 16) -> None:
        from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

        self.device = device
        self.tokens_per_step = batch
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4,
                             num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                             max_position_embeddings=4096)
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(config).to(device.torch_device).eval()
        self._cache_cls = DynamicCache
        self.batch, self.prompt, self.vocab = batch, prompt, vocab
        self._reset()

    def _reset(self) -> None:
        d = self.device.torch_device
        ids = torch.randint(0, self.vocab, (self.batch, self.prompt), device=d)
        self.cache = self._cache_cls()
        with torch.inference_mode():
            out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True)
        self.next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        self.length = self.prompt

    def run(self, steps: int, stage: Callable[..., Any], step: Callable[..., Any],
            after_step: Callable[[], Any] | None = None) -> float:
        if self.length + steps > 1024:
            self._reset()
        self.device.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _ in range(steps):
                with step("Decode"):
                    with stage("prepare input"):
                        positions = torch.full((self.batch, 1), self.length, device=self.device.torch_device)
                    with stage("forward"):
                        out = self.model(input_ids=self.next_ids, position_ids=positions,
                                         past_key_values=self.cache, use_cache=True)
                    with stage("post process"):
                        logits = out.logits[:, -1].float()
                    with stage("sample"):
                        self.next_ids = logits.argmax(-1, keepdim=True)
                self.length += 1
                if after_step is not None:
                    after_step()
        self.device.synchronize()
        return steps * self.tokens_per_step / (time.perf_counter() - t0)
