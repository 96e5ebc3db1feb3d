from fvkit.method.prompts import DEFAULT_TEMPLATE, Template, build_prompt_data, prompt_parts, prompt_string


def test_default_template_with_bos_text():
    data = build_prompt_data([("hot", "cold"), ("up", "down")], ("big", "small"), DEFAULT_TEMPLATE, "<|endoftext|>")
    assert prompt_string(data) == "<|endoftext|>Q: hot\nA: cold\n\nQ: up\nA: down\n\nQ: big\nA:"
    assert data["query_target"] == {"input": " big", "output": " small"}


def test_no_bos_text_when_the_tokenizer_adds_one():
    data = build_prompt_data([("hot", "cold")], ("big", "small"), DEFAULT_TEMPLATE, None)
    assert prompt_string(data) == "Q: hot\nA: cold\n\nQ: big\nA:"


def test_zero_shot_prompt():
    data = build_prompt_data([], ("big", "small"), DEFAULT_TEMPLATE, "<|endoftext|>")
    assert prompt_string(data) == "<|endoftext|>Q: big\nA:"


def test_parts_concatenate_to_the_prompt():
    template = Template(prefixes={"input": "In:", "output": "Out:", "instructions": "Task"},
                        separators={"input": " |", "output": ";", "instructions": ". "}, instructions="antonyms")
    data = build_prompt_data([("a", "b"), ("c", "d")], ("e", "f"), template, "<s>")
    text = "".join(part for group in prompt_parts(data) for part, _ in group)
    assert text == prompt_string(data)
    assert [len(g) for g in prompt_parts(data)] == [1, 1, 1, 6, 6, 4]
