"""Re-running a whole prompt from one block on, as its whole-prompt pass computes it.

    with PromptRecord(lm) as rec:                  # around the clean whole-prompt pass
        model(**inputs, use_cache=True)
    rec.output_norm(6)                             # L2 norm of block 6's output at the last token
    logits = rec.edited_logits(6, vec)             # the last position's logits with vec added to block 6's output

Adding the function vector to block ``L``'s output changes nothing that blocks
``0..L`` compute, so a whole-prompt pass with the vector at ``L`` (what
:func:`fvkit.method.intervene.edited_logits` runs) repeats the clean pass up to
block ``L``. The record keeps, from the clean pass, every block's output and the
arguments each block was called with; :meth:`PromptRecord.edited_logits` takes
block ``L``'s output, adds the vector at the last position, and calls blocks
``L+1..`` on the whole prompt with their recorded arguments, then the final norm
and the output head. The same operations on the same tensors give the same
numbers, at a fraction of the cost (``n_layers - L - 1`` blocks instead of all
of them, and the output head on a few positions instead of all).

The cached evaluation re-runs its near ties this way (see
:mod:`fvkit.fast.evaluation`). Whether it reproduces ``edited_logits`` bit for bit
is checked on each model's first re-run (:func:`exact_rerun`); a model where it
does not (a forward pass doing more than its blocks, final norm and head) is
re-run through the whole model from then on.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from fvkit.fast.replay import ReplayUnsupported, call_with_hidden, last_positions_call, new_update_owners
from fvkit.method.intervene import edited_logits
from fvkit.models import adapters
from fvkit.models.placement import to_like
from fvkit.models.tracer import BeforeCall, ReplaceMethod, Trace, first_tensor

#: Positions the output head reads in a whole-prompt pass whose last logits are all
#: that is used (the cached evaluation's clean pass, and a re-run). A matrix product's
#: row is rounded the same way for every row count of one kernel class, and the classes
#: depend on the CPU's BLAS: blocks of four rows on one 2-core machine here; on an
#: AVX-512 one, one row, 2-15 rows and 16 or more (measured on every SmolLM2-135M
#: projection and its output head: the head on the last 4 of 99 positions gave other
#: bits than on all 99, on the last 16 the same). Sixteen positions fall in the class of
#: any longer prompt on both, and a shorter prompt reads all of its positions, so the
#: last row's logits are the whole-prompt pass's bit for bit at a fraction of its cost.
#: A re-run is checked against the whole-model pass once per model for prompts up to
#: this length and once for longer ones (:func:`exact_rerun`). Shorter prompts: see
#: SHORT_HEAD_POSITIONS.
HEAD_POSITIONS = 16

#: Positions the output head reads for a prompt shorter than HEAD_POSITIONS. On the
#: AVX-512 machine above products of 2-15 rows share one kernel, which reads the weights
#: again for every row: SmolLM2-135M's head on the last 2 of a zero-shot prompt's 7
#: positions took 7 ms against 22 ms on all 7 (one core), the same bits. Which row counts
#: round alike depends on the CPU and the matrix (some tiny models' heads on 2 of 7 rows
#: round otherwise), so it is checked once per model and prompt length
#: (:func:`check_short_head`); until then, and where it fails, a short prompt's head reads
#: all of its positions.
SHORT_HEAD_POSITIONS = 2

#: model -> {prompt length: True once its head's last row on SHORT_HEAD_POSITIONS positions
#: equalled the row on all of them, or why not}.
_SHORT_HEAD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def head_positions(model, n_tokens: int) -> int:
    """How many of an ``n_tokens`` prompt's last positions the output head reads when only the last
    position's logits are used, so that they are the whole-prompt pass's bit for bit."""
    if n_tokens >= HEAD_POSITIONS:
        return HEAD_POSITIONS
    if _SHORT_HEAD.get(model, {}).get(n_tokens) is True:
        return min(SHORT_HEAD_POSITIONS, n_tokens)
    return n_tokens


def check_short_head(model, head, states: torch.Tensor, last_logits: torch.Tensor) -> None:
    """On a model's first short prompt of its length whose head input ``states`` (rows, all positions,
    hidden) and last-position logits on all of them are at hand: does the head on the last
    SHORT_HEAD_POSITIONS positions give the same last row? The answer sets :func:`head_positions`
    for later prompts."""
    n_tokens = states.shape[-2]
    checked = _SHORT_HEAD.setdefault(model, {})
    if n_tokens in checked or not SHORT_HEAD_POSITIONS < n_tokens < HEAD_POSITIONS:
        return
    short = head(states[:, -SHORT_HEAD_POSITIONS:])[:, -1]
    # A dispatched model's forward hands its logits back on the input's device; the head's own
    # call leaves them on its execution device. Moving a tensor keeps its bits.
    whole = last_logits.reshape(short.shape).to(short.device)
    checked[n_tokens] = True if torch.equal(whole, short) else (
        f"the output head on the last {SHORT_HEAD_POSITIONS} of {n_tokens} positions moved the last logits "
        f"by {(whole - short).abs().max().item():.3g}")


def short_head_refusal(model) -> "str | None":
    """Why some short prompts of ``model`` have the head read all their positions (None when none do,
    or no short prompt has been seen)."""
    return next((r for r in _SHORT_HEAD.get(model, {}).values() if isinstance(r, str)), None)


#: model -> why re-running from a block did not reproduce the whole-prompt pass
#: (the model's near ties are then re-run through the whole model).
_REFUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
#: model -> prompt-length classes (longer than HEAD_POSITIONS or not) whose first re-run
#: reproduced the whole-prompt pass bit for bit.
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


#: Positions (at least) a near tie's re-run carries through the blocks above the edit, for a
#: prompt longer than that: the function vector changes no earlier position, so those keep the
#: recorded pass's keys and values, and products of 16 or more rows round as the whole prompt's
#: do (see HEAD_POSITIONS). Elementwise kernels (an activation, a norm) run their vector loop
#: from the tensor's first element and the last few elements through a scalar loop: where a
#: block has a feature count that is not a multiple of RERUN_ALIGN, the window also starts a
#: multiple of RERUN_ALIGN positions into the prompt, so that every row meets the loops as it
#: does in the whole pass (tiny-llama's SiLU over 53 features gave the last row other bits on
#: 16 of 52 positions, the same on 20). On SmolLM2-135M (one core, the layer sweep of
#: present-past) the 49 shuffled-prompt near ties took 5.7 s on the last 16 positions against
#: 10.4 s on all 98-100, the same bits.
RERUN_POSITIONS = HEAD_POSITIONS
#: Two AVX-512 vectors of float32, the stride of torch's vectorized elementwise loop.
RERUN_ALIGN = 32

#: decoder blocks -> whether every linear layer of the first has feature counts that are
#: multiples of RERUN_ALIGN.
_ALIGNED_FEATURES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _aligned_features(blocks) -> bool:
    if blocks not in _ALIGNED_FEATURES:
        sizes = [n for m in blocks[0].modules() if isinstance(m, torch.nn.Linear) for n in (m.in_features, m.out_features)]
        _ALIGNED_FEATURES[blocks] = bool(sizes) and all(n % RERUN_ALIGN == 0 for n in sizes)
    return _ALIGNED_FEATURES[blocks]


def rerun_width(n_tokens: int, blocks=None) -> "int | None":
    """Positions a near tie of an ``n_tokens`` prompt is re-run on (None: all of them); ``blocks``,
    the model's decoder blocks, allow the shortest window where their features are aligned.

    Only on one thread: elementwise kernels split their work between threads by the tensor's
    size, so with several a window's rows might meet other loop boundaries (not measured)."""
    aligned = blocks is not None and _aligned_features(blocks)
    width = RERUN_POSITIONS + (0 if aligned else (n_tokens - RERUN_POSITIONS) % RERUN_ALIGN)
    return width if width < n_tokens and torch.get_num_threads() == 1 else None


_RERUN_ERRORS = (ReplayUnsupported, RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError)
#: model -> True once a re-run on the last positions (rerun_width) equalled the whole-prompt pass.
_WINDOW_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
#: model -> why re-running the last positions only was refused.
_WINDOW_REFUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class PromptRecord(contextlib.AbstractContextManager):
    """Every block's output and call arguments in one whole-prompt pass.

        with PromptRecord(lm) as rec:
            lm.model(**inputs, use_cache=True)
        rec.edited_logits(3, vec)

    Recording keeps references only: the tensors are the pass's own.
    """

    def __init__(self, lm):
        self.lm = lm
        self.blocks = adapters.resolve_blocks(lm.model, lm.spec)
        self._stack = None
        self._calls: list = []
        self._outputs: list = []
        #: layer_idx -> (keys, values) an attention layer's cache update returned in the pass
        #: (references to the pass's own tensors, for re-runs on the last positions).
        self._keys: dict = {}
        self._key_owners: list = []

    def __enter__(self):
        with contextlib.ExitStack() as stack:
            self._calls = [stack.enter_context(BeforeCall(b, retain=True, on_call=self._keep_keys))
                           for b in self.blocks]
            self._outputs = [stack.enter_context(Trace(self.lm.model, "", module=b)) for b in self.blocks]
            self._stack = stack.pop_all()
        return self

    def _keep_keys(self, args, kwargs):
        """Have every cache object a block is handed keep, per layer, the keys and values its update returns."""
        for owner in new_update_owners(args, kwargs, self._key_owners):
            self._key_owners.append(owner)
            original = owner.update

            def update(key_states, value_states, layer_idx, *rest, original=original, **kw):
                keys, values = original(key_states, value_states, layer_idx, *rest, **kw)
                self._keys[layer_idx] = (keys, values)
                return keys, values

            # Restored with the block hooks when the recorded pass's ``with`` ends.
            self._stack.enter_context(ReplaceMethod(owner, "update", update))

    def __exit__(self, exc_type, exc, tb):
        self._stack.close()
        # The block hooks' callback is this record's method: without this, record and hooks
        # would form a cycle that keeps a prompt's tensors alive until the cyclic collector runs.
        for call in self._calls:
            call.on_call = None
        return False

    def output(self, layer: int) -> torch.Tensor:
        if self._outputs[layer].fired != 1:
            raise RuntimeError(f"block {layer} ran {self._outputs[layer].fired} times in the recorded pass, expected once")
        return first_tensor(self._outputs[layer].output)

    def output_norm(self, layer: int) -> float:
        """L2 norm of block ``layer``'s output at the last position (what the injection adds to)."""
        return self.output(layer)[0, -1].float().norm().item()

    def _window_update(self, before: int):
        def update(key_states, value_states, layer_idx, *args, **kwargs):
            if layer_idx not in self._keys:
                raise ReplayUnsupported(f"attention layer {layer_idx} kept no keys in the recorded pass")
            keys, values = self._keys[layer_idx]
            return (torch.cat([keys[..., :before, :], key_states], dim=-2),
                    torch.cat([values[..., :before, :], value_states], dim=-2))
        return update

    def _owners(self) -> list:
        owners = []
        for call in self._calls:
            owners += new_update_owners(call.args, call.kwargs, owners)
        return owners

    def edited_logits(self, layer: int, vec: torch.Tensor, width: "int | None" = None) -> torch.Tensor:
        """(1, vocabulary) logits at the last position with ``vec`` added to block ``layer``'s output.

        With ``width``, blocks ``layer+1..`` run on the last ``width`` positions only, on top of
        the recorded pass's keys and values of the others (the vector changes no earlier position).
        """
        model, spec = self.lm.model, self.lm.spec
        n_tokens = self.output(layer).shape[1]
        width = n_tokens if width is None else min(width, n_tokens)
        hidden = self.output(layer)[:, n_tokens - width:].clone()   # the window's rows only
        hidden[:, -1] += to_like(vec.reshape(1, -1), hidden)
        with contextlib.ExitStack() as stack:
            # In the recorded pass every attention layer's cache started empty, so its update
            # returned the new keys and values themselves; the re-run must see exactly those
            # (the recorded ones of the positions before the window, then the window's own) and
            # leave the cache (which later steps use) as it is.
            update = (lambda k, v, *args, **kwargs: (k, v)) if width == n_tokens else self._window_update(n_tokens - width)
            for owner in self._owners():
                stack.enter_context(ReplaceMethod(owner, "update", update))
            for i in range(layer + 1, len(self.blocks)):
                call = self._calls[i]
                args, kwargs = (call.args, call.kwargs) if width == n_tokens else \
                    last_positions_call(call.args, call.kwargs, n_tokens, 1, width=width)
                hidden = first_tensor(call_with_hidden(self.blocks[i], args, kwargs, hidden))
                if width < n_tokens and not torch.equal(hidden[:, :-1], self.output(i)[:, n_tokens - width:-1]):
                    # The vector changes only the last position: the window's other rows must come out
                    # as the recorded pass computed them, or its products round otherwise.
                    raise ReplayUnsupported(f"block {i} on the last {width} positions gave the positions before "
                                            f"the last other numbers than the whole prompt's pass")
        norm, head = adapters.resolve_final_norm(model, spec), adapters.resolve_lm_head(model, spec)
        n = min(head_positions(model, n_tokens), width)
        states = norm(hidden[:, -n:])
        logits = head(states)[:, -1, :]
        if n == n_tokens:
            check_short_head(model, head, states, logits)
        return logits.clone()


def _against_whole_pass(fast: torch.Tensor, whole: torch.Tensor, what: str) -> "str | None":
    """None where a re-run's logits equal the whole-model pass's bit for bit, else why ``what`` is refused."""
    whole = whole.to(fast.device)
    if torch.equal(fast, whole):
        return None
    return f"{what} moved the logits by {(fast - whole).abs().max().item():.3g}"


def exact_rerun(lm, record: PromptRecord, inputs, layer: int, fv: torch.Tensor) -> torch.Tensor:
    """``edited_logits(lm, inputs, layer, fv)``, from the record where it gives the same numbers.

    A model's first call for a prompt up to HEAD_POSITIONS tokens long, and its first for
    a longer one, check the record's numbers against the whole-model pass and keep the
    answer: equal bit for bit, or the whole model is used from then on. Before that, a long
    prompt's re-run on its last positions (:func:`rerun_width`) is checked the same way on the
    model's first one, and refused for good where it differs."""
    model = lm.model
    if model in _REFUSED:
        return edited_logits(lm, inputs, layer, fv)
    vec = fv.reshape(lm.dims.hidden_size)
    width = rerun_width(inputs["input_ids"].shape[1], record.blocks)
    if width is not None and model not in _WINDOW_REFUSED:
        what = f"re-running the last {width} positions from layer {layer + 1}"
        try:
            fast = record.edited_logits(layer, vec, width=width)
        except _RERUN_ERRORS as err:
            _WINDOW_REFUSED[model] = f"{what} failed ({type(err).__name__}: {err})"
        else:
            if model in _WINDOW_CHECKED:
                return fast
            whole = edited_logits(lm, inputs, layer, fv)
            refusal = _against_whole_pass(fast, whole, what)
            if refusal is None:
                _WINDOW_CHECKED[model] = True
            else:
                _WINDOW_REFUSED[model] = refusal
            return whole
    what = f"re-running the blocks from layer {layer + 1}"
    try:
        fast = record.edited_logits(layer, vec)
    except _RERUN_ERRORS as err:
        _REFUSED[model] = f"{what} failed ({type(err).__name__}: {err})"
        return edited_logits(lm, inputs, layer, fv)
    length_class = inputs["input_ids"].shape[1] > HEAD_POSITIONS
    if length_class in _CHECKED.get(model, ()):
        return fast
    whole = edited_logits(lm, inputs, layer, fv)
    refusal = _against_whole_pass(fast, whole, what)
    if refusal is None:
        _CHECKED.setdefault(model, set()).add(length_class)
    else:
        _REFUSED[model] = refusal
    return whole


def rerun_refusal(model) -> "str | None":
    """Why near ties of ``model`` are re-run through the whole model (None when they are not)."""
    return _REFUSED.get(model)


def window_refusal(model) -> "str | None":
    """Why near ties of ``model``'s long prompts are re-run on all positions (None when they are not,
    or no long prompt's near tie has been re-run)."""
    return _WINDOW_REFUSED.get(model)
