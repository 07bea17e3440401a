"""The answer mask found from token byte lengths equals transformers' own, token for token, on any text."""

import copy
import json

import pytest
from conftest import REPO_ROOT, SAMPLE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma_sft import data
from gemma_sft.data import answer_mask


def _belle_conversations(path):
    rows = [json.loads(line) for line in path.read_text("utf-8").splitlines()]
    return [data.to_messages(data.Record(f"row {i}", row), "belle") for i, row in enumerate(rows)]


def _same(tokenizer, conversations):
    fast, reference = (
        answer_mask.ids_and_masks(tokenizer, conversations),
        answer_mask.reference(tokenizer, conversations),
    )
    for row, (ids, mask, ref_ids, ref_mask) in enumerate(zip(*fast, *reference)):
        assert list(ids) == ref_ids and mask == ref_mask, f"row {row}: {conversations[row]!r}"
    return fast


def test_every_bundled_row_gets_transformers_ids_and_mask(tokenizer):
    conversations = _belle_conversations(SAMPLE) + _belle_conversations(REPO_ROOT / "data" / "belle_eval_zh.jsonl")
    assert answer_mask.token_bytes(tokenizer) is not None  # Gemma 3's tokenizer takes the fast path
    ids, masks = _same(tokenizer, conversations)
    assert len(ids) == len(conversations) > 500 and all(sum(mask) > 1 for mask in masks)


def test_system_prompts_and_several_turns(tokenizer):
    conversations = [
        [{"role": "system", "content": "你是一位耐心的老师。"}, {"role": "user", "content": "什么是质数？"},
         {"role": "assistant", "content": "只能被1和自身整除的大于1的整数。"}, {"role": "user", "content": "举例"},
         {"role": "assistant", "content": "2、3、5、7。"}],
        [{"role": "user", "content": "   "}, {"role": "assistant", "content": "  \n "}],  # trimmed to nothing
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<end_of_turn>x<start_of_turn>"}],
    ]  # fmt: skip
    _, masks = _same(tokenizer, conversations)
    assert sum(masks[0]) > sum(masks[1]) == 1  # an empty answer still supervises its <end_of_turn>


def test_rows_the_byte_count_cannot_place_go_through_transformers(tokenizer, monkeypatch):
    """A literal "▁" (which the normalizer also writes for a space) and characters the vocabulary spells in bytes."""
    conversations = [
        [{"role": "user", "content": "a\u2581b c"}, {"role": "assistant", "content": "\u2581\u2581 end"}],
        [{"role": "user", "content": "𠀀𪚥"}, {"role": "assistant", "content": "𠀀𪚥😀"}],
    ]
    calls = []
    original = answer_mask.reference
    monkeypatch.setattr(answer_mask, "reference", lambda tok, rows: calls.append(len(rows)) or original(tok, rows))
    ids, _ = _same(tokenizer, conversations)
    assert any(answer_mask._BYTE_TOKEN.fullmatch(token) for token in tokenizer.convert_ids_to_tokens(ids[1]))
    assert calls[0] == 1  # only the row with "▁" needed transformers; byte-spelled characters are placed exactly


def test_a_tokenizer_of_another_kind_takes_transformers_path(tokenizer):
    from tokenizers import pre_tokenizers

    other = copy.deepcopy(tokenizer)
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # pieces no longer follow the text
    assert answer_mask.token_bytes(other) is None
    _same(other, _belle_conversations(SAMPLE)[:20])


text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=120) | st.sampled_from(
    ["\u2581", " \u2581 ", "<end_of_turn>", "<start_of_turn>model\n", "<bos>", "\n\n\n", "𝔘𝔫𝔦😀", "\x00\x1b[31m"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(st.tuples(text, text), min_size=1, max_size=3), system=st.none() | text)
def test_any_text_gets_transformers_ids_and_mask(tokenizer, turns, system):
    conversation = [{"role": "system", "content": system}] if system is not None else []
    for question, answer in turns:
        conversation += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    _same(tokenizer, [conversation, conversation[: 1 + (system is not None)]] if len(turns) > 1 else [conversation])


@pytest.mark.parametrize("fast", [True, False])
def test_the_switch_picks_the_path_and_both_prepare_the_same_rows(tmp_path, tokenizer, monkeypatch, fast):
    def refuse(*args):
        raise AssertionError("the switched-off path was taken")

    monkeypatch.setattr(answer_mask, "reference" if fast else "_by_byte_lengths", refuse)
    conversations = data.load_conversations(str(SAMPLE), cache=False)
    prepared = data.prepare(
        conversations, tokenizer, max_samples=300, eval_samples=20, max_length=512, seed=3, cache=False,
        fast_mask=fast,
    )  # fmt: skip
    monkeypatch.undo()
    expected = data.prepare(conversations, tokenizer, max_samples=300, eval_samples=20, max_length=512, seed=3,
                            cache=False, fast_mask=not fast)  # fmt: skip
    assert prepared.train[:] == expected.train[:] and prepared.eval[:] == expected.eval[:]
    assert prepared.skipped == expected.skipped
