"""Does the tokenizer follow the spec's BOS policy?

    check_bos_policy(lm)        # SpecError naming the spec, the model and the fix

A spec says either that the tokenizer adds BOS by itself (``prepend_bos=True``)
or that ``bos_text`` is written at the start of every prompt. A spec that
contradicts its tokenizer still runs to the end, but every prompt then starts
with two BOS tokens or none, and the first prompt token is labelled BOS; so
``fvkit resolve``, ``fvkit run`` and the parity gate M5 all refuse it here,
before any long computation.
"""

from __future__ import annotations

from fvkit.errors import SpecError


def check_bos_policy(lm) -> None:
    """The tokenizer must add BOS exactly when the spec says it does, and ``bos_text``
    must be one token, so that prompts start with exactly one BOS either way."""
    spec = lm.spec
    adds = lm.tokenizer_adds_bos()
    if adds != spec.prepend_bos:
        raise SpecError(
            f"ModelSpec '{spec.name}' says prepend_bos={spec.prepend_bos}, but this tokenizer "
            f"{'adds' if adds else 'does not add'} a BOS token by itself (model '{lm.name}'); prompts would "
            f"{'start with two BOS tokens' if adds else 'have no BOS token'}. Use a spec whose "
            f"prepend_bos={adds} (leave out --model-spec to use the one chosen from the model), "
            f"or fix add_bos_token in the tokenizer_config.json"
        )
    if not spec.prepend_bos:
        ids = lm.tokenizer(spec.bos_text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise SpecError(
                f"ModelSpec '{spec.name}': bos_text={spec.bos_text!r} is {len(ids)} tokens "
                f"for the tokenizer of model '{lm.name}', not one special token; set bos_text to its "
                f"BOS/EOS token"
            )
