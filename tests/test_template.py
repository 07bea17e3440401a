"""The chat template renders the official Gemma 3 text and supervises exactly each answer plus its <end_of_turn>."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma_sft.data import tokenize

SYSTEM_MULTI_TURN = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "  你好\n"},
    {"role": "assistant", "content": "你好！有什么可以帮你？ "},
    {"role": "user", "content": "1+1 等于几？"},
    {"role": "assistant", "content": "等于 2。"},
]


def render(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_single_turn_matches_the_official_format(tokenizer):
    text = render(tokenizer, [{"role": "user", "content": "写一首诗"}, {"role": "assistant", "content": "春眠不觉晓"}])
    assert text == "<bos><start_of_turn>user\n写一首诗<end_of_turn>\n<start_of_turn>model\n春眠不觉晓<end_of_turn>\n"


def test_system_prompt_is_folded_into_the_first_user_turn_and_contents_are_trimmed(tokenizer):
    assert render(tokenizer, SYSTEM_MULTI_TURN) == (
        "<bos><start_of_turn>user\n你是一个乐于助人的助手。\n\n你好<end_of_turn>\n"
        "<start_of_turn>model\n你好！有什么可以帮你？<end_of_turn>\n"
        "<start_of_turn>user\n1+1 等于几？<end_of_turn>\n"
        "<start_of_turn>model\n等于 2。<end_of_turn>\n"
    )


def test_system_text_itself_is_not_trimmed_like_the_official_template(tokenizer):
    text = render(tokenizer, [{"role": "system", "content": " 规则 "}, {"role": "user", "content": "问"}])
    assert text == "<bos><start_of_turn>user\n 规则 \n\n问<end_of_turn>\n"


def test_generation_prompt_opens_a_model_turn(tokenizer):
    text = render(tokenizer, [{"role": "user", "content": "你好"}], add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\n你好<end_of_turn>\n<start_of_turn>model\n"


def test_list_content_parts_render_like_strings(tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": " 你好 "}]}]
    assert render(tokenizer, parts) == "<bos><start_of_turn>user\n你好<end_of_turn>\n"


def test_roles_must_alternate(tokenizer):
    with pytest.raises(Exception, match="alternate"):
        render(tokenizer, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_control_tokens_are_single_tokens(tokenizer):
    ids = tokenizer.encode("<start_of_turn>user\n你好<end_of_turn>", add_special_tokens=False)
    assert ids[0] == 105 and ids[-1] == 106 and tokenizer.convert_ids_to_tokens(106) == "<end_of_turn>"
    assert len(ids) < 8  # real merges, not one token per character


@pytest.mark.parametrize("messages", [SYSTEM_MULTI_TURN, SYSTEM_MULTI_TURN[1:3]])
def test_exactly_the_answers_and_their_end_of_turn_are_supervised(tokenizer, messages):
    encoded = tokenize(tokenizer, messages)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    supervised = [token for token, bit in zip(ids, mask) if bit]
    expected = []
    for message in messages:
        if message["role"] == "assistant":
            expected += tokenizer.encode(message["content"].strip(), add_special_tokens=False) + [106]
    assert supervised == expected
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    # the newline after each <end_of_turn> and every prompt token stay unsupervised
    for position, token in enumerate(ids):
        if token == 106 and mask[position]:
            assert mask[position + 1] == 0


# The official template as shipped by google/gemma-3-*-it, which TRL's package carries: our rendering must match it
# byte for byte on any conversation (the {% generation %} markers render as nothing).
def _official_template() -> str:
    from importlib.resources import files

    return files("trl").joinpath("chat_templates", "gemma3.jinja").read_text(encoding="utf-8")


text_parts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)
contents = text_parts | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text_parts}), min_size=1,
                                 max_size=3)  # fmt: skip


@st.composite
def conversations(draw):
    messages = [{"role": "system", "content": draw(text_parts)}] if draw(st.booleans()) else []
    for turn in range(draw(st.integers(1, 4))):
        messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": draw(contents)})
    return messages


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations(), generation_prompt=st.booleans())
def test_rendering_matches_the_official_template_on_any_conversation(tokenizer, messages, generation_prompt):
    ours = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    official = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=_official_template()
    )
    assert ours == official
