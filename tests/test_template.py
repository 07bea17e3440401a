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


def small_tokenizer_folder(folder):
    """A tokenizer folder laid out as the Gemma 3 one is (tokenizer.json and tokenizer_config.json, padding on the
    left, no chat template) with a few tokens, <end_of_turn> among them: reading the real one takes seconds, and what
    is checked below is when a folder is read, not what it holds."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "user", "model", "\n"]
    backend = Tokenizer(models.BPE(vocab={piece: i for i, piece in enumerate(pieces)}, merges=[], unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                            pad_token="<pad>", padding_side="left").save_pretrained(folder)  # fmt: skip
    return folder


def test_a_tokenizer_folder_is_read_once_per_process_until_it_changes(tmp_path):
    """read_tokenizer shares one object per folder and chat template; an edited folder is read again."""
    from gemma_sft.models import load_tokenizer, read_chat_template, read_tokenizer

    folder = small_tokenizer_folder(tmp_path / "tokenizer")
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    first = read_tokenizer(str(folder))
    assert read_tokenizer(str(folder)) is first
    ours = load_tokenizer(str(folder))
    ours_template = read_chat_template(None)
    assert ours is not first and ours.chat_template == ours_template and load_tokenizer(str(folder)) is ours
    assert first.chat_template != ours_template  # the other caller's object kept its own template

    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"padding_side": "left"', '"padding_side": "right"'))
    again = read_tokenizer(str(folder))
    assert again is not first and again.padding_side == "right" and first.padding_side == "left"


def test_greedy_generation_pads_on_the_left_without_changing_the_shared_tokenizer(tokenizer_dir, tiny_model_dir,
                                                                                  tmp_path):  # fmt: skip
    import shutil

    from transformers import AutoModelForCausalLM

    from gemma_sft.inference.generate import generate
    from gemma_sft.models import load_tokenizer

    folder = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, folder)
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"padding_side": "left"', '"padding_side": "right"'))
    tokenizer = load_tokenizer(str(folder))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = [[{"role": "user", "content": "你好"}], [{"role": "user", "content": "请用三句话介绍一下北京的历史。"}]]
    answers = generate(model, tokenizer, prompts, max_new_tokens=3)
    alone = generate(model, tokenizer, prompts[:1], max_new_tokens=3)
    assert len(answers) == 2 and answers[0] == alone[0]  # left padding: the short prompt's answer is unchanged
    assert tokenizer.padding_side == "right"  # the shared object as it was loaded
