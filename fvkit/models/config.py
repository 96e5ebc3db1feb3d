"""Model dimensions read from a transformers config, whatever its attribute names.

    dims = dims_from_config(model.config, get_spec("gemma"))
    dims.n_heads * dims.head_dim      # width of what the out-projection reads

GPT-2 calls the layer count ``n_layer``, LLaMA ``num_hidden_layers``; Gemma sets
``head_dim`` independently of ``hidden_size // n_heads``. Every consumer of
head geometry reads it from :class:`ModelDims`, never from a formula of its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fvkit.errors import SpecError
from fvkit.models.spec import ModelSpec

#: Candidate attribute names, most common first. The first one present and not
#: None wins.
LAYER_ATTRS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
HEAD_ATTRS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
HIDDEN_ATTRS = ("hidden_size", "n_embd", "d_model", "dim")
KV_HEAD_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num")
HEAD_DIM_ATTRS = ("head_dim", "attention_head_dim", "kv_channels")
VOCAB_ATTRS = ("vocab_size", "padded_vocab_size", "n_vocab")


@dataclass(frozen=True)
class ModelDims:
    """Static sizes of a decoder.

        ModelDims(n_layers=2, n_heads=3, head_dim=16, hidden_size=40, n_kv_heads=1, vocab_size=32000)

    ``head_dim`` is per attention head; ``n_heads * head_dim`` is the
    out-projection's input width, which need not equal ``hidden_size``.
    """

    n_layers: int
    n_heads: int
    head_dim: int
    hidden_size: int
    n_kv_heads: int
    vocab_size: int

    @property
    def attn_width(self) -> int:
        """Input width of the attention out-projection (all heads concatenated)."""
        return self.n_heads * self.head_dim

    def as_dict(self) -> dict:
        return asdict(self)


def _text_config(config):
    # Multimodal configs nest the decoder's settings; the decoder is what fvkit hooks.
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _lookup(config, names, what: str, *, required: bool = True):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SpecError(
                    f"model config field '{name}' ({what}) is {value!r}, not a positive integer; "
                    f"the checkpoint's config.json is malformed"
                )
            return value
    if required:
        raise SpecError(
            f"model config {type(config).__name__} has none of {list(names)} ({what}); "
            f"fvkit cannot read this architecture's dimensions"
        )
    return None


def dims_from_config(config, spec: ModelSpec) -> ModelDims:
    """Read the decoder's dimensions from ``config`` and check them against ``spec``.

    A spec that pins a static dimension (``n_heads=...``) fails here, naming the
    field, the spec's value and the config's value, when the model differs.
    """
    config = _text_config(config)
    n_layers = _lookup(config, LAYER_ATTRS, "number of layers")
    n_heads = _lookup(config, HEAD_ATTRS, "number of attention heads")
    hidden = _lookup(config, HIDDEN_ATTRS, "hidden size")
    vocab = _lookup(config, VOCAB_ATTRS, "vocabulary size")
    n_kv = _lookup(config, KV_HEAD_ATTRS, "number of key/value heads", required=False) or n_heads
    head_dim = _lookup(config, HEAD_DIM_ATTRS, "head dimension", required=False)
    if head_dim is None:
        if hidden % n_heads:
            raise SpecError(
                f"model config gives no head_dim and hidden size {hidden} is not divisible by "
                f"{n_heads} heads; set head_dim in the config"
            )
        head_dim = hidden // n_heads
    if n_heads % n_kv:
        raise SpecError(
            f"model config has {n_heads} attention heads and {n_kv} key/value heads; "
            f"grouped-query attention needs the first to be a multiple of the second"
        )
    dims = ModelDims(n_layers=n_layers, n_heads=n_heads, head_dim=head_dim,
                     hidden_size=hidden, n_kv_heads=n_kv, vocab_size=vocab)
    check_spec_dims(dims, spec)
    return dims


def check_spec_dims(dims: ModelDims, spec: ModelSpec) -> None:
    """Fail when a dimension the spec pins differs from the model's."""
    for field in ("n_layers", "n_heads", "head_dim", "hidden_size"):
        expected = getattr(spec, field)
        actual = getattr(dims, field)
        if expected is not None and expected != actual:
            raise SpecError(
                f"ModelSpec '{spec.name}': field '{field}' is {expected} but the model's config "
                f"says {actual}; this spec does not describe this model (pass another "
                f"--model-spec or fix the spec)"
            )
