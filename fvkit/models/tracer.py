"""A small tracer: every hook fvkit puts on a model goes through this module.

    with Trace(model, "model.layers.3.self_attn.o_proj", retain_input=True) as t:
        model(**inputs)
    t.input        # first positional input of o_proj (what the out-projection reads)
    t.fired        # how many times the hook ran; 0 means the path was never executed

    with EditInput(o_proj, lambda x: patched(x)):         # change an input before the module runs
    with BeforeCall(block, on_call=record):               # see (args, kwargs) before the module runs
    with StopBefore(lm_head):                             # end the forward pass in front of a module

Hooks are registered on ``__enter__`` (not at construction) and always removed
in ``__exit__``, even when the forward pass raises. Keyword inputs are captured
too, and an edit function receives and may return either a tensor or a tuple,
so the same edit works whether a decoder block returns ``hidden`` or
``(hidden, ...)``.

The one interception that is not a module hook is :class:`ReplaceMethod`: a
key/value cache is not a module, so nothing can hook it, yet the fast indirect
effect (:mod:`fvkit.fast.replay`) must see and answer every attention layer's
``cache.update(keys, values, layer_idx)``. It shadows that method on the one
cache instance and restores it on ``__exit__``, exactly like a hook's removal.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from typing import Callable, Iterable, Optional

import torch


def first_tensor(value):
    """The main tensor of a module output: the tensor itself or a tuple's first item."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"expected a tensor or a tuple starting with one, got {type(value).__name__}")


def replace_first_tensor(value, tensor: torch.Tensor):
    """Return ``value`` with its main tensor replaced, keeping tuple/tensor form."""
    if isinstance(value, torch.Tensor):
        return tensor
    return type(value)((tensor, *value[1:])) if isinstance(value, tuple) else [tensor, *value[1:]]


def _call_edit(fn: Callable, output, name: str, inputs, kwargs):
    params = inspect.signature(fn).parameters
    accepted = {"output": output, "name": name, "inputs": inputs, "kwargs": kwargs}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**accepted)
    return fn(**{k: v for k, v in accepted.items() if k in params})


def _detached(value, clone: bool):
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.clone() if clone else value
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v, clone) for v in value)
    return value


class Trace(contextlib.AbstractContextManager):
    """Retain (and optionally edit) one module's input and output.

        with Trace(model, "transformer.h.0", edit_output=lambda output: output) as t:
            model(ids)
        assert t.fired == 1

    ``edit_output`` is called with any of the keyword arguments ``output``,
    ``name``, ``inputs`` (positional inputs) and ``kwargs`` (keyword inputs) that
    it declares, and returns the new output (or None to keep it).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        name: str,
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        clone: bool = False,
        edit_output: Optional[Callable] = None,
        module: Optional[torch.nn.Module] = None,
    ):
        self.name = name
        self.module = module if module is not None else model.get_submodule(name)
        self.retain_input = retain_input
        self.retain_output = retain_output
        self.clone = clone
        self.edit_output = edit_output
        self.input = None
        self.inputs = None
        self.kwargs = None
        self.output = None
        self.fired = 0
        self._handle = None

    def _hook(self, module, args, kwargs, output):
        self.fired += 1
        if self.edit_output is not None:
            edited = _call_edit(self.edit_output, output, self.name, args, kwargs)
            if edited is not None:
                output = edited
        if self.retain_input:
            self.inputs = _detached(args, self.clone)
            self.kwargs = {k: _detached(v, self.clone) for k, v in kwargs.items()}
            self.input = self.inputs[0] if self.inputs else next(iter(self.kwargs.values()), None)
        if self.retain_output:
            self.output = _detached(output, self.clone)
        return output

    def __enter__(self):
        self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def close(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class TraceDict(OrderedDict, contextlib.AbstractContextManager):
    """Trace several modules at once, keyed by name.

        with TraceDict(model, ["model.layers.0", "model.layers.1"]) as td:
            model(ids)
        td["model.layers.1"].output

    Options are shared by all traces; ``edit_output`` receives ``name`` so one
    function can edit several modules.
    """

    def __init__(self, model: torch.nn.Module, names: Iterable[str], **options):
        super().__init__()
        for name in names:
            if name not in self:
                self[name] = Trace(model, name, **options)

    def __enter__(self):
        entered = []
        try:
            for trace in self.values():
                trace.__enter__()
                entered.append(trace)
        except BaseException:
            for trace in reversed(entered):
                trace.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def close(self):
        for trace in reversed(list(self.values())):
            trace.close()

    @property
    def not_fired(self) -> list:
        return [name for name, trace in self.items() if trace.fired == 0]


class BeforeCall(contextlib.AbstractContextManager):
    """See, and optionally change, a module's inputs before it runs.

        with BeforeCall(block, retain=True) as b:
            model(**inputs)
        b.args, b.kwargs, b.fired

    ``on_call(args, kwargs)`` runs first on every call (it may raise to stop the
    pass). ``edit_input(x)`` receives the first positional input and returns the
    tensor to use instead, so the module's own forward (weights, bias, layout)
    computes the output; ``edit_call(args, kwargs)`` returns the ``(args, kwargs)``
    to call with instead, for edits that span several arguments. ``retain`` keeps
    the latest call's inputs as passed (not copied).
    """

    def __init__(self, module: torch.nn.Module, *, edit_input: Optional[Callable] = None,
                 on_call: Optional[Callable] = None, retain: bool = False, edit_call: Optional[Callable] = None):
        self.module = module
        self.edit_input = edit_input
        self.edit_call = edit_call
        self.on_call = on_call
        self.retain = retain
        self.args = None
        self.kwargs = None
        self.fired = 0
        self._handle = None

    def _hook(self, module, args, kwargs):
        self.fired += 1
        if self.on_call is not None:
            self.on_call(args, kwargs)
        if self.retain:
            self.args, self.kwargs = args, dict(kwargs)
        if self.edit_input is not None:
            args = (self.edit_input(args[0]), *args[1:])
        if self.edit_call is not None:
            args, kwargs = self.edit_call(args, dict(kwargs))
        return (args, kwargs) if self.edit_input is not None or self.edit_call is not None else None

    def __enter__(self):
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def close(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class EditInput(BeforeCall):
    """Replace a module's first positional input before it runs.

        with EditInput(o_proj, lambda x: patched(x)) as e:
            model(**inputs)
        assert e.fired == 1

    The function receives the input tensor and returns the tensor to use instead,
    so the module's own forward (weights, bias, layout) computes the output.
    """

    def __init__(self, module: torch.nn.Module, fn: Callable):
        super().__init__(module, edit_input=fn)
        self.fn = fn


class _Reached(Exception):
    """Raised in front of the module a :class:`StopBefore` guards; never leaves its ``with``."""


class StopBefore(BeforeCall):
    """End forward passes in front of ``module``: the ``with`` block ends there, quietly.

        with TraceDict(model, names, retain_input=True) as td, StopBefore(lm_head):
            model(**inputs)            # everything up to the output head runs; td holds the inputs

    For passes that only read activations, so the module and everything after it
    need not run. A pass that never reaches the module simply runs to its end;
    ``fired`` says whether it was reached.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__(module, on_call=self._stop)

    @staticmethod
    def _stop(args, kwargs):
        raise _Reached

    def __exit__(self, exc_type, exc, tb):
        super().__exit__(exc_type, exc, tb)
        return exc_type is not None and issubclass(exc_type, _Reached)


class ReplaceMethod(contextlib.AbstractContextManager):
    """Shadow ``obj.name`` with ``fn`` on this one instance; restored on exit.

        with ReplaceMethod(cache, "update", recording_update):
            model(...)

    For objects that are not modules and so cannot be hooked (a key/value
    cache; see the module docstring). The class's own method is untouched; an
    instance attribute of the same name that was there before comes back.
    """

    _ABSENT = object()

    def __init__(self, obj, name: str, fn: Callable):
        self.obj = obj
        self.name = name
        self.fn = fn
        self._saved = self._ABSENT
        self._active = False

    def __enter__(self):
        self._saved = getattr(self.obj, "__dict__", {}).get(self.name, self._ABSENT)
        setattr(self.obj, self.name, self.fn)
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._active:
            self._active = False
            if self._saved is self._ABSENT:
                with contextlib.suppress(AttributeError):
                    delattr(self.obj, self.name)
            else:
                setattr(self.obj, self.name, self._saved)
        return False
