"""export.py: the merged model as one GGUF file that transformers' GGUF reader and llama.cpp run like the HF model."""

import errno
import importlib.util
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml
from conftest import run_script

from gemma_sft import REPO_ROOT, UserError
from gemma_sft.models import embedded

pytestmark = pytest.mark.train  # every test here trains a model or uses a trained one

CHINESE = "你好，请用三句话介绍一下北京的历史和文化。"
MARKED = "<start_of_turn>user\n天气怎么样？<end_of_turn>\n<start_of_turn>model\n晴。<end_of_turn>\n\n\n  空格"


@pytest.fixture(autouse=True, scope="module")
def parse_each_gguf_once():
    """gguf's reader parses the 262k-entry vocabulary one element at a time, and these tests and transformers' GGUF
    loader open each file several times: each written file is parsed once here, over a plain array (below)."""
    readers = {}

    def reader(path, mode="r"):
        stat = Path(path).stat()
        key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size, mode)
        if key not in readers:
            readers[key] = PlainArrayReader(path, mode)
        return readers[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", reader)
        yield


class PlainArrayReader(gguf.GGUFReader):
    """gguf's reader over a plain ndarray view of the mapped file rather than the np.memmap itself: every slice of a
    memmap runs numpy's Python-level memmap bookkeeping, and the reader takes several slices of each of the 262k
    vocabulary entries (about two thirds of its time). The same bytes, read the same way."""

    def __setattr__(self, name, value):
        if name == "data" and isinstance(value, np.memmap):
            value = value.view(np.ndarray)
        super().__setattr__(name, value)


# `make test` builds llama.cpp and every export here then checks itself in it; `make test-fast` does not build it
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed (see the Makefile)")


def export(adapter, output, *flags):
    if not HAVE_LLAMA_CPP:
        flags = (*flags, "--no-verify")
    return run_script("export.py", "--adapter", adapter, "--output", output, *flags)


def export_here(capsys, adapter, output, *flags) -> str:
    """export.py's `main` in this process, what it printed. The script itself runs as a user runs it in the 270M's
    shared fixture and the refusals below; here the tokenizer and libraries this process already loaded are reused."""
    from gemma_sft.commands import export as export_script

    if not HAVE_LLAMA_CPP:
        flags = (*flags, "--no-verify")
    capsys.readouterr()
    assert export_script.main(["--adapter", str(adapter), "--output", str(output), *flags]) == 0
    return capsys.readouterr().out


def merged(adapter: Path):
    """The model export.py writes, built the way merge.py builds it (bf16 base + adapter, merged), in float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gemma_sft import models

    base, _ = models.adapter_base(adapter)
    model = AutoModelForCausalLM.from_pretrained(models.resolve_model(base), dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.float().eval(), models.read_tokenizer(str(adapter))  # the object export.py reads, once per process


def fields(gguf: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.eot_token_id" and len(field.data) > 1:
            continue  # the 262k-entry token arrays are checked through the tokenizer
        out[key] = field.contents()
    out["tensors"] = {t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in reader.tensors}
    return out


_read_back = {}  # (file, its size and time) -> model: several tests read the 270M's f16 file


def read_back(folder: Path, name: str):
    """The GGUF file loaded by transformers' own GGUF reader (it dequantizes q8_0), once per file in this process.

    That reader fills layer_types from Gemma 3's fixed every-6th-layer rule and ignores the per-layer
    `attention.sliding_window_pattern` key llama.cpp reads, and it leaves query_pre_attn_scalar at its default of 256
    where llama.cpp scales attention by the key length: both are taken from the file here."""
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM

    stat = (folder / name).stat()
    key = (str((folder / name).resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _read_back:
        return _read_back[key]
    fields = GGUFReader(folder / name).fields
    pattern = fields["gemma3.attention.sliding_window_pattern"].contents()
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.layer_types = ["sliding_attention" if flag else "full_attention" for flag in pattern]
    config.query_pre_attn_scalar = fields["gemma3.attention.key_length"].contents()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32)
    _read_back[key] = model.eval()
    return _read_back[key]


def prompt_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]  # the template writes the one <bos>


def assert_same_logits(reference, exported, ids: list[int], tolerance: float) -> None:
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids])).logits[0]
        got = exported(input_ids=torch.tensor([ids])).logits[0]
    error = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= tolerance * scale, f"max |logit difference| {error:.4g} against logits up to {scale:.4g}"
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def assert_same_tokenizer(gguf: Path, tokenizer) -> None:
    """The vocabulary in the file (tokens, scores, types) rebuilds a tokenizer that splits text like the adapter's:
    `embedded.build_tokenizer` reads scores as SentencePiece-BPE merge ranks, as llama.cpp does."""
    rebuilt = embedded.build_tokenizer(gguf)
    for text in (CHINESE, MARKED, "Hello world, 1234567 tokens!\tdone"):
        assert rebuilt(text)["input_ids"] == tokenizer(text)["input_ids"], text


def random_adapter(base: str | Path, out: Path, recipe_model: str, seed: int = 0) -> Path:
    """A PEFT adapter with random non-zero LoRA B weights (so merging changes every targeted weight), saved in the
    layout sft.py writes: adapter files, the tokenizer with our chat template, and recipe.yaml."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gemma_sft.models import load_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q|k|v|o|gate|up|down)_proj"
                      if hasattr(model.config, "text_config") else "all-linear")  # fmt: skip
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.01)
    peft_model.save_pretrained(out)
    load_tokenizer(str(base)).save_pretrained(out)
    (out / "recipe.yaml").write_text(yaml.safe_dump({"model_name_or_path": recipe_model}), encoding="utf-8")
    return out


# --- the tiny random Gemma 3 (fast) ---


def test_tiny_adapter_exports_a_gguf_transformers_reads_back(tiny_adapter, tmp_path, capsys):
    out = tmp_path / "tiny-gguf"
    printed = export_here(capsys, tiny_adapter, out)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "tiny-gguf.gguf"]
    if HAVE_LLAMA_CPP:  # the file was read back in llama.cpp before it was published
        assert "checked in llama.cpp: 3 chats give the merged model's prompt (one <bos>)" in printed
    gguf = out / "tiny-gguf.gguf"
    reference, tokenizer = merged(tiny_adapter)

    meta = fields(gguf)
    assert meta["general.architecture"] == "gemma3"
    assert meta["gemma3.block_count"] == 2 and meta["gemma3.attention.key_length"] == 32
    assert meta["gemma3.attention.sliding_window"] == 8
    assert meta["gemma3.attention.sliding_window_pattern"] == [True, False]  # the config's layer_types
    assert meta["gemma3.rope.freq_base"] == 1e6 and meta["gemma3.rope.freq_base_swa"] == 1e4
    assert meta["tokenizer.ggml.model"] == "llama"
    ids = [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "eot", "padding", "unknown")]
    assert ids == [2, 1, 106, 0, 3]
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert meta["tensors"]["token_embd.weight"] == ("F16", [64, 262144])
    assert meta["tensors"]["blk.0.attn_norm.weight"] == ("F32", [64])
    assert "output.weight" not in meta["tensors"]  # tied: llama.cpp reuses the embedding
    assert len(meta["tensors"]) == 2 + 2 * 13

    # the norms are stored as 1 + w (llama.cpp multiplies by the stored weight)
    from gguf import GGUFReader

    stored = {t.name: t.data for t in GGUFReader(gguf).tensors}
    hf_norm = reference.model.layers[1].self_attn.q_norm.weight.detach()
    assert torch.allclose(torch.from_numpy(stored["blk.1.attn_q_norm.weight"].copy()), 1 + hf_norm)

    exported = read_back(out, gguf.name)
    assert_same_logits(reference, exported, prompt_ids(tokenizer, CHINESE), tolerance=2e-3)
    assert_same_tokenizer(gguf, tokenizer)

    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-gguf.gguf\n")
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile and "<start_of_turn>model" in modelfile
    readme = (out / "README.md").read_text()
    assert "ollama create tiny-gguf -f Modelfile" in readme and "llama-cli -m tiny-gguf.gguf -cnv" in readme


def test_multimodal_base_exports_the_language_model_only(tiny_multimodal_dir, tmp_path, capsys):
    adapter = random_adapter(tiny_multimodal_dir, tmp_path / "adapter", str(tiny_multimodal_dir))
    out = tmp_path / "mm-gguf"
    printed = export_here(capsys, adapter, out, "--type", "q8_0")
    assert "language model only, vision tower left out" in printed
    meta = fields(out / "mm-gguf.gguf")
    assert not any("vision" in name or "mm" in name.split(".")[0] for name in meta["tensors"])
    # the 4B's padded vocabulary (262208 rows) is cut to the tokenizer's 262144, as llama.cpp's converter does
    assert meta["tensors"]["token_embd.weight"] == ("Q8_0", [64, 262144])
    assert meta["tensors"]["blk.0.ffn_down.weight"][0] == "Q8_0"
    assert meta["tensors"]["blk.0.ffn_norm.weight"][0] == "F32"
    assert "vision tower was left out" in (out / "README.md").read_text()


def test_overwrite_replaces_an_existing_export(quick_adapter, tmp_path, capsys):
    out = tmp_path / "again"
    out.mkdir()
    (out / "old.txt").write_text("old")
    export_here(capsys, quick_adapter, out, "--overwrite", "--name", "mine")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "mine.gguf"]


# --- bad input: one line, non-zero exit, nothing half-written ---


@pytest.fixture(scope="module")
def quick_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished adapter on the tiny model without a training run (for the checks that need any adapter)."""
    return random_adapter(tiny_model_dir, tmp_path_factory.mktemp("quick") / "adapter", str(tiny_model_dir))


def one_error_line(result) -> str:
    """The message of a refused run: exit status 2 and exactly one `error:` line, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial" in p.name or ".old-" in p.name]


def test_missing_adapter_is_one_line(tmp_path):
    empty = tmp_path / "not-an-adapter"
    empty.mkdir()
    result = export(empty, tmp_path / "out")
    assert "adapter_config.json missing" in one_error_line(result)
    assert result.stderr.strip().count("\n") == 0  # refused before anything is loaded
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)


def test_existing_output_is_refused_without_overwrite(quick_adapter, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = export(quick_adapter, out)
    assert "--overwrite" in one_error_line(result)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not no_leftovers(tmp_path)


def test_unwritable_destination_is_one_line(quick_adapter, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = export(quick_adapter, blocker / "out")
    assert "cannot write there" in one_error_line(result)
    assert result.stderr.strip().count("\n") == 0  # refused before the model is loaded
    assert blocker.read_text() == "not a folder"


@needs_llama_cpp
def test_a_file_that_runs_differently_is_refused_and_not_written(quick_adapter, tmp_path, monkeypatch):
    """A mapping bug (norms stored as w, not 1 + w: the file loads and runs, and answers wrongly) stops the export
    at its self-check: one line naming the first differing token, and no folder."""
    from gemma_sft.commands import export as export_script
    from gemma_sft.export import gguf_file

    original = gguf_file._as_array

    def norms_as_they_are(tensor, gguf_name, kind):
        return original(tensor - 1.0 if gguf_name.endswith("norm.weight") else tensor, gguf_name, kind)

    monkeypatch.setattr(gguf_file, "_as_array", norms_as_they_are)
    out = tmp_path / "wrong"
    with pytest.raises(UserError, match="does not run like the model") as caught:
        export_script.main(["--adapter", str(quick_adapter), "--output", str(out)])
    assert "\n" not in str(caught.value) and "--no-verify" in str(caught.value)
    assert not out.exists() and not no_leftovers(tmp_path)


def test_no_verify_says_so(quick_adapter, tmp_path, capsys):
    from gemma_sft.commands import export as export_script

    assert export_script.main(["--adapter", str(quick_adapter), "--output", str(tmp_path / "x"), "--no-verify"]) == 0
    assert "not checked in llama.cpp (--no-verify)" in capsys.readouterr().out


def test_missing_llama_cpp_is_one_line_before_loading(quick_adapter, tmp_path, monkeypatch):
    import gemma_sft.export
    from gemma_sft.commands import export as export_script

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now fails as if not installed
    monkeypatch.setattr(gemma_sft.export, "merged_model", lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(UserError, match=r"llama\.cpp is not installed here.*--no-verify") as caught:
        export_script.main(["--adapter", str(quick_adapter), "--output", str(tmp_path / "y")])
    assert "\n" not in str(caught.value) and not (tmp_path / "y").exists()


def test_full_disk_leaves_nothing_behind(quick_adapter, tmp_path, monkeypatch):
    import gguf

    from gemma_sft.commands import export as export_script

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    out = tmp_path / "full"
    with pytest.raises(UserError, match="No space left on device") as caught:
        export_script.main(["--adapter", str(quick_adapter), "--output", str(out)])
    assert "\n" not in str(caught.value)
    assert not out.exists() and not no_leftovers(tmp_path)


# --- the embedded Gemma 3 270M (slow) ---


@pytest.mark.slow
def test_270m_f16_matches_the_merged_model(f16_270m, merged_270m):
    reference, tokenizer = merged_270m
    gguf = f16_270m / "gemma3-270m-test.gguf"
    meta = fields(gguf)
    assert meta["gemma3.attention.sliding_window_pattern"] == [(i + 1) % 6 != 0 for i in range(18)]
    original = fields(embedded._gguf_file())
    same = ["context_length", "embedding_length", "feed_forward_length", "attention.head_count", "rope.freq_base",
            "attention.head_count_kv", "attention.key_length", "attention.sliding_window"]  # fmt: skip
    for key in same:
        assert meta[f"gemma3.{key}"] == original[f"gemma3.{key}"], key
    assert {name: shape for name, (_, shape) in meta["tensors"].items()} == {
        name: shape for name, (_, shape) in original["tensors"].items()
    }
    exported = read_back(f16_270m, gguf.name)
    assert_same_logits(reference, exported, prompt_ids(tokenizer, CHINESE), tolerance=1e-2)
    assert_same_tokenizer(gguf, tokenizer)


@pytest.mark.slow
def test_270m_q8_0_answer_loss_within_1_percent_of_f16(adapter_270m, f16_270m, tmp_path, capsys):
    from gemma_sft.data import detect_format, load_records, to_messages
    from gemma_sft.inference import answer_loss

    out = tmp_path / "q8"
    export_here(capsys, adapter_270m, out, "--type", "q8_0", "--no-verify")  # the check itself: test_270m_* above
    q8_size = (out / "q8.gguf").stat().st_size
    assert q8_size < 0.6 * (f16_270m / "gemma3-270m-test.gguf").stat().st_size

    records = load_records(str(REPO_ROOT / "data" / "belle_eval_zh.jsonl"))[:4]
    rows = [to_messages(record, detect_format(record)) for record in records]
    tokenizer = merged_270m_tokenizer(adapter_270m)
    files = (f16_270m / "gemma3-270m-test.gguf", out / "q8.gguf")
    if HAVE_LLAMA_CPP:  # the files as llama.cpp runs them
        f16, q8 = (llama_cpp_answer_loss(gguf, tokenizer, rows) for gguf in files)
    else:  # transformers' GGUF reader (it dequantizes q8_0)
        f16, q8 = (answer_loss(read_back(gguf.parent, gguf.name), tokenizer, rows)["loss"] for gguf in files)
    assert abs(q8 - f16) <= 0.01 * f16, (q8, f16)


def merged_270m_tokenizer(adapter: Path):
    from gemma_sft.models import read_tokenizer

    return read_tokenizer(str(adapter))


def llama_cpp_answer_loss(gguf: Path, tokenizer, conversations) -> float:
    """`inference.answer_loss` of a GGUF file in llama.cpp: the mean cross-entropy over the same supervised tokens
    (each answer and its <end_of_turn>, from `data.tokenize`), from llama.cpp's logits at every position."""
    import llama_cpp

    from gemma_sft.data import tokenize
    from gemma_sft.export.verify import quiet_stderr

    encoded = [tokenize(tokenizer, messages) for messages in conversations]
    with quiet_stderr():
        llm = llama_cpp.Llama(str(gguf), n_ctx=max(len(e["input_ids"]) for e in encoded), logits_all=True,
                              verbose=False, n_threads=2, seed=0)  # fmt: skip
    total, count = 0.0, 0
    try:
        for row in encoded:
            ids = row["input_ids"]
            # position t - 1 predicts token t
            targets = [t for t in range(1, len(ids)) if row["assistant_masks"][t]]
            llm.reset()
            llm.eval(ids)
            logits = torch.from_numpy(np.array(llm.scores[[t - 1 for t in targets]], dtype=np.float32))
            labels = torch.tensor([ids[t] for t in targets])
            total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            count += len(targets)
    finally:
        llm.close()
    return total / count


# Greedy continuations are compared for 20 tokens: llama.cpp's CPU kernels round activations to f16 inside its
# matrix products, so the two runs' logits differ by ~1e-3; over a long continuation two nearly tied candidates
# eventually meet and the texts may part for a reason that is not a bug. 20 tokens is long enough to cover a
# short answer and its <end_of_turn> and short enough that a tie is unlikely.
GREEDY_TOKENS = 20
PROMPTS = ["1加1等于几？只回答数字。", "中国的首都是哪里？请用一句话回答。", "Say hello in one word."]


@pytest.mark.slow
def test_270m_llama_cpp_greedy_matches_hf(f16_270m, merged_270m):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (see the Makefile)")
    reference, tokenizer = merged_270m
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    llm = llama_cpp.Llama(str(f16_270m / "gemma3-270m-test.gguf"), n_ctx=256, n_threads=2, verbose=False, seed=0)
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    for prompt in PROMPTS:
        ids = prompt_ids(tokenizer, prompt)
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids  # llama.cpp's own tokenizer

        with torch.no_grad():
            hf = reference.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                    eos_token_id=[1, end_of_turn], pad_token_id=0)[0, len(ids):].tolist()  # fmt: skip
        llm.reset()
        ours = []
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            ours.append(token)
            if token in (tokenizer.eos_token_id, end_of_turn) or len(ours) == GREEDY_TOKENS:
                break
        print(f"{prompt!r}: llama.cpp {tokenizer.decode(ours)!r} | HF {tokenizer.decode(hf)!r}")
        assert ours == hf, prompt
        # llama.cpp's own stopping rule: it ends the completion at an end-of-generation token (the EOT from the file)
        llm.reset()
        completion = llm.create_completion(ids, max_tokens=GREEDY_TOKENS, temperature=0.0, top_k=1,
                                           repeat_penalty=1.0)["choices"][0]  # fmt: skip
        stopped = end_of_turn in hf
        assert completion["finish_reason"] == ("stop" if stopped else "length"), completion
        if stopped:
            assert completion["text"] == tokenizer.decode(hf[:-1]), completion
    assert llm.metadata["tokenizer.ggml.eot_token_id"] == str(end_of_turn)
