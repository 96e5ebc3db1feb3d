"""Token meta-labels and the single-token slot layout.

    labels, text = token_meta_labels(prompt_data, tokenizer, prepend_bos=False)
    dummy = dummy_token_labels(n_shots=10, tokenizer=tokenizer, prepend_bos=False)
    idx_map, idx_avg = slot_index_map(labels, dummy)

Each token of a prompt gets a label naming its role (``demonstration_3_token``,
``demonstration_3_label_token``, ``separator_token``, ``predictive_token``,
``end_of_example_token``, ``query_*``, ``bos_token`` ...). Labels are found
the reference's way: the prompt is grown part by part and each part gets as many
labels as it added tokens. That rule has consequences kept on purpose, because
parity needs them:

* a part that adds no token (it merged into its neighbour) overwrites the
  previous token's label with its own;
* the last token of each output prefix ("A:") becomes ``predictive_token`` and
  the first token of each output separator becomes ``end_of_example_token``
  (if that separator added no token, the prompt's first label is rewritten
  instead — a no-op for the labels that occur there);
* tokens and labels are paired up to the shorter of the two lists.

The dummy layout assumes every input and output is one token; ``slot_index_map``
maps a real prompt's tokens onto it, multi-token words sharing one slot.
"""

from __future__ import annotations

from typing import Optional

from fvkit.method.prompts import DEFAULT_TEMPLATE, Template, build_prompt_data, prompt_parts, prompt_string

#: Position of a part within a demonstration/query group.
OUTPUT_PREFIX_POS = 3
OUTPUT_SEPARATOR_POS = 5


def extend_labels(groups: list, tokenizer, label_init: Optional[list] = None) -> list:
    labels = list(label_init or [])
    text = ""
    n_tokens = len(tokenizer.tokenize(text))  # of ``text``, which only grows: each prefix is tokenized once
    for group in groups:
        for pos, (part, label) in enumerate(group):
            if not part:
                continue
            text += part
            before, n_tokens = n_tokens, len(tokenizer.tokenize(text))
            added = n_tokens - before
            if added == 0:
                labels[-1] = label
            labels.extend([label] * added)
            if pos == OUTPUT_PREFIX_POS:
                labels[-1] = labels[-1].replace("structural", "predictive").replace("separator", "predictive")
            if pos == OUTPUT_SEPARATOR_POS:
                labels[-added] = labels[-added].replace("separator", "end_of_example")
    return labels


def token_meta_labels(prompt_data: dict, tokenizer, prepend_bos: bool) -> tuple:
    """([(index, decoded token, label), ...], prompt string) for one prompt.

    ``prepend_bos`` is the spec's policy: the tokenizer adds a BOS token, which
    ``tokenize`` does not show, so its label is seeded here.
    """
    labels = extend_labels(prompt_parts(prompt_data), tokenizer, ["bos_token"] if prepend_bos else [])
    text = prompt_string(prompt_data)
    ids = tokenizer(text).input_ids
    tokens = [tokenizer.decode(i) for i in ids]
    return [(i, tok, lab) for i, (tok, lab) in enumerate(zip(tokens, labels))], text


def dummy_token_labels(n_shots: int, tokenizer, prepend_bos: bool, bos_text: str,
                       template: Template = DEFAULT_TEMPLATE) -> list:
    """[(slot, label), ...] for a prompt whose every input and output is the word 'a'."""
    data = build_prompt_data([("a", "a")] * n_shots, ("a", "a"), template, None if prepend_bos else bos_text)
    labels, _ = token_meta_labels(data, tokenizer, prepend_bos)
    return [(i, lab) for i, _, lab in labels]


def slot_index_map(token_labels: list, dummy_labels: list) -> tuple:
    """Map token positions to dummy slots.

    Returns ``idx_map`` ({first token of each word, and every other token: slot})
    and ``idx_avg`` ({label: (first, last)} for demonstration words spanning more
    than one token, whose activations are averaged into one slot). Tokens after
    the first of a multi-token word are left out of ``idx_map``; the remaining
    tokens are paired with the dummy slots in order.
    """
    demo = [(i, lab) for i, _, lab in token_labels if "demo" in lab]
    spans: dict = {}
    seen: set = set()
    later = set()
    for i, lab in demo:
        lo, hi = spans.get(lab, (i, i))
        spans[lab] = (min(lo, i), max(hi, i))
        if lab in seen:
            later.add(i)
        seen.add(lab)
    idx_avg = {lab: spans[lab] for lab in sorted(spans) if spans[lab][1] - spans[lab][0] > 0}
    kept = [i for i, _, _ in token_labels if i not in later]
    idx_map = {k: slot for k, (slot, _) in zip(kept, dummy_labels)}
    return idx_map, idx_avg


def full_index_map(idx_map: dict, idx_avg: dict) -> dict:
    """``idx_map`` extended to every token of each multi-token word (its word's slot)."""
    extra = {}
    for lo, hi in idx_avg.values():
        for k in range(lo, hi + 1):
            if k not in idx_map:
                extra[k] = idx_map[lo]
    return {**idx_map, **extra}
