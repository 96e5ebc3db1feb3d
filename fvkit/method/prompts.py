"""In-context prompts in the reference's layout.

    data = build_prompt_data([("hot", "cold")], ("up", "down"), DEFAULT_TEMPLATE, bos_text="<|endoftext|>")
    prompt_string(data)   # '<|endoftext|>Q: hot\\nA: cold\\n\\nQ: up\\nA:'

``prompt_data`` is the reference's dictionary (instructions, prefixes,
separators, examples, query_target) so token labelling can walk the same parts
in the same order. A space is written before every input and output; when the
tokenizer does not add a BOS token itself, ``bos_text`` is written before the
instructions prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence


@dataclass(frozen=True)
class Template:
    """Prefixes and separators around inputs, outputs and instructions.

        Template(prefixes={"input": "Q:", "output": "A:", "instructions": ""},
                 separators={"input": "\\n", "output": "\\n\\n", "instructions": ""})
    """

    prefixes: dict = field(default_factory=lambda: {"input": "Q:", "output": "A:", "instructions": ""})
    separators: dict = field(default_factory=lambda: {"input": "\n", "output": "\n\n", "instructions": ""})
    instructions: str = ""

    def as_dict(self) -> dict:
        return {"prefixes": dict(self.prefixes), "separators": dict(self.separators), "instructions": self.instructions}

    def __hash__(self):
        return hash((tuple(sorted(self.prefixes.items())), tuple(sorted(self.separators.items())), self.instructions))


DEFAULT_TEMPLATE = Template()


def build_prompt_data(
    demos: Sequence[tuple],
    query: Optional[tuple],
    template: Template = DEFAULT_TEMPLATE,
    bos_text: Optional[str] = None,
) -> dict:
    """Demonstration pairs (labels already in their final order) and a query pair."""
    prefixes = dict(template.prefixes)
    if bos_text:
        prefixes["instructions"] = bos_text + prefixes["instructions"]
    return {
        "instructions": template.instructions,
        "prefixes": prefixes,
        "separators": dict(template.separators),
        "examples": [{"input": " " + str(x), "output": " " + str(y)} for x, y in demos],
        "query_target": None if query is None else {"input": " " + str(query[0]), "output": " " + str(query[1])},
    }


def prompt_string(prompt_data: dict, query: Optional[str] = None) -> str:
    """The full prompt, ending with the output prefix the model must continue."""
    pre, sep = prompt_data["prefixes"], prompt_data["separators"]
    if query is None:
        query = prompt_data["query_target"]["input"]
    text = pre["instructions"] + prompt_data["instructions"] + sep["instructions"]
    for ex in prompt_data["examples"]:
        text += pre["input"] + ex["input"] + sep["input"] + pre["output"] + ex["output"] + sep["output"]
    return text + pre["input"] + query + sep["input"] + pre["output"]


def prompt_parts(prompt_data: dict) -> list:
    """The prompt as labelled parts: a list of groups, each a list of (text, label).

    Groups are the instruction pieces (one part each), one group of six parts per
    demonstration and one group of four for the query; the position of a part in
    its group drives the predictive/end-of-example relabelling in token_labels.
    """
    pre, sep = prompt_data["prefixes"], prompt_data["separators"]
    query = prompt_data["query_target"]["input"]
    groups = [
        [(pre["instructions"], "bos_token")],
        [(prompt_data["instructions"], "instructions_token")],
        [(sep["instructions"], "separator_token")],
    ]
    for i, ex in enumerate(prompt_data["examples"], start=1):
        groups.append([
            (pre["input"], "structural_token"),
            (ex["input"], f"demonstration_{i}_token"),
            (sep["input"], "separator_token"),
            (pre["output"], "structural_token"),
            (ex["output"], f"demonstration_{i}_label_token"),
            (sep["output"], "separator_token"),
        ])
    groups.append([
        (pre["input"], "query_structural_token"),
        (query, "query_demonstration_token"),
        (sep["input"], "query_separator_token"),
        (pre["output"], "query_structural_token"),
    ])
    return groups
