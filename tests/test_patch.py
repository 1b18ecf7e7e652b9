"""The integration core's patcher on live objects (``Patcher.wrap_object``): a method whose class the engine
chooses at run time (a worker, a speculator) is wrapped once per object, put back by ``uninstall()``, and a
missing one is one warning, never an error in the engine."""

from __future__ import annotations

import logging
from types import SimpleNamespace as NS

from otel_npu.integrations import vllm as plugin
from otel_npu.integrations._patch import Patcher


class Worker:
    def sample_tokens(self, batch):
        return f"sampled {batch}"


def counting(calls):
    def make(original):
        def wrapped(*args):
            calls.append(args)
            return original(*args)

        return wrapped

    return make


def test_an_objects_method_is_wrapped_once_and_uninstall_shows_the_class_method_again():
    patcher = Patcher("toy engine", logging.getLogger("test_patch"))
    worker, other = Worker(), Worker()
    calls: list = []
    assert patcher.wrap_object(worker, "sample_tokens", counting(calls), "the step's end")
    assert patcher.wrap_object(worker, "sample_tokens", counting(calls), "the step's end")  # already: not twice
    assert worker.sample_tokens("b1") == "sampled b1"
    assert calls == [("b1",)]  # one wrapper, the engine's result unchanged
    assert other.sample_tokens("b2") == "sampled b2" and calls == [("b1",)]  # only that object
    patcher.uninstall()
    assert "sample_tokens" not in vars(worker)  # the class's own method, as before
    assert worker.sample_tokens("b3") == "sampled b3" and calls == [("b1",)]


def test_an_attribute_the_object_itself_held_is_put_back_as_it_was():
    patcher = Patcher("toy engine", logging.getLogger("test_patch"))

    def own(batch):
        return f"own {batch}"

    worker = NS(sample_tokens=own)
    assert patcher.wrap_object(worker, "sample_tokens", counting([]), "the step's end")
    assert worker.sample_tokens is not own
    patcher.uninstall()
    assert worker.sample_tokens is own


def test_an_object_without_the_method_is_one_warning_per_class_and_never_raises(caplog):
    patcher = Patcher("toy engine", logging.getLogger("test_patch"))
    caplog.set_level(logging.WARNING, logger="test_patch")
    for _ in range(3):
        assert patcher.wrap_object(NS(), "sample_tokens", counting([]), "the step's end") is False
    assert patcher.wrap_object(None, "propose", counting([]), "the draft stage") is False
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert "cannot hook SimpleNamespace.sample_tokens in this toy engine" in warnings[0]
    assert "left out: the step's end" in warnings[0]
    assert "NoneType.propose" in warnings[1] and "left out: the draft stage" in warnings[1]


def test_the_vllm_plugins_hooks_on_live_objects_are_undone_by_uninstall():
    """The worker's ``sample_tokens`` and the speculator's ``propose`` are hooked on the objects vLLM built;
    ``uninstall()`` undoes them as it undoes the table's hooks."""

    class Speculator:
        def propose(self, *args):
            return "drafts"

    worker, speculator = Worker(), Speculator()
    try:
        plugin._hook_sample_tokens(NS(worker=worker))
        plugin._hook_propose(NS(speculator=speculator))
        assert "sample_tokens" in vars(worker) and "propose" in vars(speculator)
    finally:
        plugin.uninstall()
    assert "sample_tokens" not in vars(worker) and "propose" not in vars(speculator)
    assert worker.sample_tokens("b") == "sampled b" and speculator.propose() == "drafts"
