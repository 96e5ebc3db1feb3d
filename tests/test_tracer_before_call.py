"""The tracer's before-call hooks and method replacement: they act, and they always leave."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fvkit.models.tracer import BeforeCall, EditInput, ReplaceMethod, StopBefore


def tiny_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def hook_count(module: torch.nn.Module) -> int:
    return len(module._forward_pre_hooks)


def test_before_call_sees_inputs_and_edits_the_first_one():
    net, x = tiny_net(), torch.ones(1, 4)
    with BeforeCall(net[2], retain=True) as seen:
        clean = net(x)
    assert seen.fired == 1 and torch.equal(seen.args[0], net[1](net[0](x)))
    with EditInput(net[2], torch.zeros_like) as edit:
        edited = net(x)
    assert edit.fired == 1 and torch.equal(edited, net[2].bias.detach().expand(1, 2))
    assert not torch.equal(edited, clean)
    assert hook_count(net[2]) == 0


def test_on_call_runs_before_the_module_and_can_stop_it():
    net, calls = tiny_net(), []
    with BeforeCall(net[0], on_call=lambda args, kwargs: calls.append(args[0].shape)):
        net(torch.ones(3, 4))
    assert calls == [torch.Size([3, 4])]


def test_stop_before_ends_the_pass_quietly():
    net = tiny_net()
    with BeforeCall(net[0], retain=True) as first, StopBefore(net[2]) as stop:
        net(torch.ones(1, 4))
        pytest.fail("the pass should have ended in front of the last layer")
    assert first.fired == 1 and stop.fired == 1
    assert hook_count(net[0]) == 0 and hook_count(net[2]) == 0


def test_hooks_are_removed_when_the_pass_raises():
    net = tiny_net()

    def boom(args, kwargs):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        with BeforeCall(net[0], on_call=boom), EditInput(net[2], lambda x: x):
            net(torch.ones(1, 4))
    assert hook_count(net[0]) == 0 and hook_count(net[2]) == 0


class Store:
    def update(self, value):
        return f"class {value}"


def test_replace_method_shadows_one_instance_and_restores_it():
    store, other = Store(), Store()
    with pytest.raises(RuntimeError):
        with ReplaceMethod(store, "update", lambda value: f"patched {value}"):
            assert store.update(1) == "patched 1" and other.update(1) == "class 1"
            raise RuntimeError
    assert store.update(2) == "class 2" and "update" not in vars(store)
    store.update = lambda value: f"own {value}"  # an instance attribute that was there before comes back
    with ReplaceMethod(store, "update", lambda value: "patched"):
        assert store.update(3) == "patched"
    assert store.update(3) == "own 3"


def test_exact_and_fast_strategies_do_not_import_each_other():
    """The exact strategy must load without the fast package (the pipeline holds the table)."""
    code = ("import sys, fvkit.method.indirect_effect, fvkit.method.head_effect; "
            "print(any(m.startswith('fvkit.fast') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


def test_every_ie_mode_has_a_strategy():
    from fvkit.method.run_defaults import DEFAULT_IE_MODE, IE_MODES
    from fvkit.pipeline import IE_STRATEGIES

    assert sorted(IE_STRATEGIES) == sorted(IE_MODES) and DEFAULT_IE_MODE in IE_MODES
