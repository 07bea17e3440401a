"""serve.py: the adapter's GGUF export behind llama.cpp's OpenAI-compatible server, driven with the official openai
client; and the merged folder's layout against what vLLM's and transformers' Gemma 3 loaders expect."""

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import CONTEXT_270M as CONTEXT
from test_export import GREEDY_TOKENS, random_adapter

from gemma_sft import REPO_ROOT, UserError
from gemma_sft.export import layout

TEMPLATE_TOKENS = ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<pad>")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(log: Path, *args, timeout: float = 600):
    """serve.py in its own process, as a user starts it; yields its base URL once /v1/models answers."""
    import httpx

    port = free_port()
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "serve.py", *map(str, args), "--port", str(port)],
                                   cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the endpoint on the embedded Gemma 3 270M (slow: one export, one server, one reference model per module) ---


@pytest.fixture(scope="module")
def client(adapter_270m, f16_270m):
    openai = pytest.importorskip("openai", reason="the openai client comes with requirements-llama-cpp.txt")
    with running_server(adapter_270m.parent / "serve.log", "--adapter", adapter_270m, "--gguf", f16_270m,
                        "--threads", 2) as url:  # fmt: skip
        yield openai.OpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=600)


_greedy_answers = {}


def greedy(merged_270m, messages) -> tuple[str, int, str]:
    """The merged model's greedy answer in transformers: (text, token count without the stop, finish_reason)."""
    key = json.dumps(messages, ensure_ascii=False)
    if key not in _greedy_answers:
        _greedy_answers[key] = _greedy(*merged_270m, messages)
    return _greedy_answers[key]


def _greedy(model, tokenizer, messages) -> tuple[str, int, str]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    with torch.no_grad():
        answer = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=stops,
                                pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()  # fmt: skip
    if answer[-1] in stops:
        return tokenizer.decode(answer[:-1]), len(answer) - 1, "stop"
    return tokenizer.decode(answer), len(answer), "length"


def ask(client, messages, **options):
    options = {"temperature": 0, "max_tokens": GREEDY_TOKENS, **options}
    return client.chat.completions.create(model="belle-270m", messages=messages, **options)


def ask_streamed(client, messages, **options) -> tuple[str, str]:
    pieces, finish = [], None
    for chunk in ask(client, messages, stream=True, **options):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(pieces), finish


def clean(text: str) -> None:
    assert not any(token in text for token in TEMPLATE_TOKENS), text


CHINESE = [{"role": "user", "content": "中国的首都是哪里？请用一句话回答。"}]
ENGLISH = [{"role": "user", "content": "Say hello in one word."}]
SYSTEM = [{"role": "system", "content": "Always answer in English."}, *CHINESE]


@pytest.mark.slow
def test_the_server_names_the_adapter(client):
    assert [model.id for model in client.models.list().data] == ["belle-270m"]


@pytest.mark.slow
@pytest.mark.parametrize("messages", [CHINESE, ENGLISH], ids=["chinese", "english"])
def test_answers_and_streams_equal_the_merged_models_greedy_answer(client, merged_270m, messages):
    text, count, finish = greedy(merged_270m, messages)
    answer = ask(client, messages)
    assert answer.choices[0].message.content == text  # Chinese text round-trips: same tokens, same characters
    assert answer.usage.completion_tokens == count and answer.choices[0].finish_reason == finish
    assert ask_streamed(client, messages) == (text, finish)  # multi-byte characters split over tokens rejoin
    clean(text)
    if messages is CHINESE:
        assert any("\u4e00" <= char <= "\u9fff" for char in text), text


@pytest.mark.slow
def test_a_system_message_is_honoured(client, merged_270m):
    text, _, _ = greedy(merged_270m, SYSTEM)  # the template folds it into the first user turn, as in training
    assert ask(client, SYSTEM).choices[0].message.content == text
    assert text != greedy(merged_270m, CHINESE)[0]


@pytest.mark.slow
def test_the_answer_ends_at_end_of_turn_and_prints_no_template_token(client, merged_270m):
    _, tokenizer = merged_270m
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    # Pushed to say <end_of_turn> at once, the engine must end the answer there, empty
    answer = ask(client, ENGLISH, logit_bias={str(end_of_turn): 100})
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content == ""
    assert answer.usage.completion_tokens == 0
    assert ask_streamed(client, ENGLISH, logit_bias={str(end_of_turn): 100}) == ("", "stop")
    # Pushed towards the other template tokens, none of them shows up as text either
    nudged = {str(tokenizer.convert_tokens_to_ids(t)): 5 for t in ("<start_of_turn>", "<bos>", "<pad>")}
    clean(ask(client, CHINESE, logit_bias=nudged, max_tokens=8).choices[0].message.content)


@pytest.mark.slow
def test_eight_concurrent_requests_all_get_their_answer(client):
    chats = [[{"role": "user", "content": f"数到{n}。"}] for n in range(4)]
    expected = [ask(client, chat, max_tokens=8).choices[0].message.content for chat in chats]

    def one(index: int) -> str:  # half streamed, half not: a new request must not cut a stream short
        chat = chats[index % 4]
        if index % 2:
            text, finish = ask_streamed(client, chat, max_tokens=8)
            assert finish in ("stop", "length")
            return text
        return ask(client, chat, max_tokens=8).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert answers == [expected[index % 4] for index in range(8)]


@pytest.mark.slow
def test_malformed_requests_get_a_4xx_json_error_and_the_server_keeps_serving(client):
    import httpx
    import openai

    url = str(client.base_url).rstrip("/") + "/chat/completions"
    malformed = [b'{"messages": [', b"[1, 2]", b'{"messages": []}',
                 b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "lots"}']  # fmt: skip
    for body in malformed:
        response = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error", response.text
    bad = [
        [{"role": "wizard", "content": "x"}],  # a role the template does not know
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],  # roles that do not alternate
        [{"role": "user", "content": "很长的问题" * 400}],  # longer than the context
    ]
    for messages in bad:
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, messages)
        assert caught.value.status_code == 400
    assert f"maximum context length is {CONTEXT} tokens" in str(caught.value)  # the recipe's max_length
    assert ask(client, ENGLISH, max_tokens=4).choices[0].message.content  # still serving


@pytest.mark.slow
def test_the_merged_270m_loads_in_vllm_and_transformers(adapter_270m, tmp_path):
    from gemma_sft.commands import merge

    assert merge.main(["--adapter", str(adapter_270m), "--output", str(tmp_path / "merged")]) == 0
    assert layout.check_merged(tmp_path / "merged") == []


# --- serve.py's own checks, and the merged layouts on tiny models (fast) ---


@pytest.fixture(scope="module")
def small_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return random_adapter(tiny_model_dir, tmp_path_factory.mktemp("small") / "small", str(tiny_model_dir))


def refusal(*argv) -> str:
    """serve.py's one-line refusal (exit status 2 through gemma_sft.errors.run), in this process: no start-up cost."""
    from gemma_sft.commands import serve

    with pytest.raises(UserError) as caught:
        serve.main([str(arg) for arg in argv])
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_without_an_export_it_says_how(small_adapter):
    line = refusal("--adapter", small_adapter)
    assert f"no GGUF export at {small_adapter}-gguf" in line and "python export.py --adapter" in line


def test_a_missing_adapter_is_one_line(tmp_path):
    assert "adapter_config.json missing" in refusal("--adapter", tmp_path)


def test_other_hosts_get_a_warning():
    from gemma_sft.export.serve import host_warning

    assert host_warning("127.0.0.1", 8000, None) is None and host_warning("::1", 8000, None) is None
    assert "no API key" in host_warning("0.0.0.0", 8000, None)
    assert "plain HTTP" in host_warning("192.168.1.5", 8000, "secret")


def test_requests_are_checked_and_completed(tokenizer):
    pytest.importorskip("llama_cpp.server.app", reason="llama.cpp's server is not installed (see the Makefile)")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from gemma_sft.export.serve import SAMPLING_DEFAULTS, OpenAIRequests

    formatter = Jinja2ChatFormatter(template=tokenizer.chat_template, eos_token="<eos>", bos_token="<bos>")
    requests = OpenAIRequests(app=None, name="mine", formatter=formatter)
    chat = "/v1/chat/completions"
    completed = requests.check(chat, json.dumps({"messages": [{"role": "user", "content": "你好"}]}).encode())
    assert completed["model"] == "mine" and all(completed[key] == value for key, value in SAMPLING_DEFAULTS.items())
    kept = requests.check(chat, b'{"messages": [{"role": "user", "content": "x"}], "temperature": 0, "model": "m"}')
    assert kept["temperature"] == 0 and kept["model"] == "m"
    for body, reason in [
        (b"{", "not valid JSON"),
        (b'"text"', "JSON object"),
        (b'{"messages": {}}', "non-empty list"),
        (b'{"messages": [{"role": "tool", "content": "x"}]}', "'role' must be one of"),
        (b'{"messages": [{"role": "user", "content": "x"}], "top_p": "high"}', "top_p"),
        (b'{"messages": [{"role": "assistant", "content": "x"}]}', "chat template refuses"),
    ]:
        with pytest.raises(ValueError, match=reason):
            requests.check(chat, body)
    assert requests.check("/v1/completions", b'{"prompt": "x"}')["repeat_penalty"] == 1.0


def test_the_server_gets_the_completed_body_and_a_bad_one_never_reaches_it(tokenizer):
    pytest.importorskip("llama_cpp.server.app", reason="llama.cpp's server is not installed (see the Makefile)")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from starlette.testclient import TestClient

    from gemma_sft.export.serve import OpenAIRequests

    received = []

    async def server(scope, receive, send):  # stands in for llama-cpp-python's app
        body = (await receive())["body"]
        received.append((body, int(dict(scope["headers"])[b"content-length"])))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"answered"})

    formatter = Jinja2ChatFormatter(template=tokenizer.chat_template, eos_token="<eos>", bos_token="<bos>")
    http = TestClient(OpenAIRequests(server, "mine", formatter, api_key="key"))
    key = {"authorization": "Bearer key"}
    chat = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 3}
    assert http.post("/v1/chat/completions", json=chat, headers=key).text == "answered"
    body, declared = received.pop()
    assert json.loads(body)["repeat_penalty"] == 1.0 and json.loads(body)["max_tokens"] == 3 and declared == len(body)
    refused = http.post("/v1/chat/completions", content=b"{", headers=key)
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"
    assert not received
    # without the key the body is not looked at: the server's own 401 comes first
    assert http.post("/v1/chat/completions", content=b"{").text == "answered" and received.pop()[0] == b"{"


def merged_folder(base: Path, out: Path) -> Path:
    from gemma_sft.commands import merge

    adapter = random_adapter(base, out.parent / f"{out.name}-adapter", str(base))
    assert merge.main(["--adapter", str(adapter), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def hub_multimodal_dir(tiny_multimodal_dir, tmp_path_factory) -> Path:
    """The tiny Gemma3ForConditionalGeneration in the layout of google/gemma-3-4b-it's files (its SigLIP weights
    under vision_tower.vision_model.). transformers 5 writes a model in the layout it was loaded from; one built in
    memory, as conftest's is, gets vision_tower.embeddings... instead."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("hub-layout") / "gemma3-tiny-it"
    shutil.copytree(tiny_multimodal_dir, folder)
    weights = load_file(folder / "model.safetensors")
    hub = {f"vision_tower.vision_model.{name[13:]}" if name.startswith("vision_tower.") else name: weight
           for name, weight in weights.items()}  # fmt: skip
    assert any(name.startswith("vision_tower.vision_model.") for name in hub)
    save_file(hub, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def loads_whole_in_transformers(folder: Path) -> None:
    import transformers

    config = json.loads((folder / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    _, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


@pytest.fixture(scope="module")
def merged_small(small_adapter) -> Path:
    """small_adapter merged by merge.py: a Gemma3ForCausalLM like the 270M (tests change copies of it)."""
    from gemma_sft.commands import merge

    out = small_adapter.parent / "small-merged"
    assert merge.main(["--adapter", str(small_adapter), "--output", str(out)]) == 0
    return out


@pytest.mark.parametrize("kind", ["text", "multimodal"])
def test_merged_folders_have_the_layout_vllm_and_transformers_load(kind, merged_small, hub_multimodal_dir,
                                                                   tmp_path):  # fmt: skip
    """270M-like (Gemma3ForCausalLM) and 4B-like (Gemma3ForConditionalGeneration) merges: the check passes, and
    agrees with transformers' real loader; the known ways to get it wrong are caught."""
    if kind == "text":
        folder = Path(shutil.copytree(merged_small, tmp_path / "merged"))
    else:
        folder = merged_folder(hub_multimodal_dir, tmp_path / "merged")
    config = layout.read_config(folder)
    assert config["architectures"] == [layout.TEXT_CLASS if kind == "text" else layout.MULTIMODAL_CLASS]
    assert layout.check_merged(folder) == []
    loads_whole_in_transformers(folder)

    tensors = layout.read_tensors(folder)
    if kind == "multimodal":  # a 4B saved as the text class (LLaMA-Factory 8317, unsloth 2086)
        as_text = config | {"architectures": [layout.TEXT_CLASS]}
        assert "Gemma3ForCausalLM needs model_type gemma3_text" in layout.check_layout(as_text, tensors)[0]
        text_only = {**config["text_config"], "architectures": [layout.TEXT_CLASS]}
        problems = layout.check_layout(text_only, tensors)
        assert any(problem.startswith("vLLM: ") and "unexpected" in problem for problem in problems)
    left = {name.replace("q_proj.weight", "q_proj.base_layer.weight"): value for name, value in tensors.items()}
    assert any("not merged" in problem for problem in layout.check_layout(config, left))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    assert any("<end_of_turn>" in problem for problem in layout.check_merged(folder))


def test_a_vision_tower_vllm_cannot_load_is_caught(tiny_multimodal_dir, tmp_path):
    """Merged from a Gemma 3 that transformers built in memory, the vision tower is written without the
    vision_model. level that vLLM's SigLIP loader names its weights by: transformers reads it, vLLM would not."""
    folder = merged_folder(tiny_multimodal_dir, tmp_path / "merged")
    problems = layout.check_merged(folder)
    assert problems and all(problem.startswith("vLLM: ") for problem in problems), problems
    assert "vision_tower.vision_model." in problems[0]


def test_vllm_engine_prints_the_commands_after_checking_the_merged_folder(small_adapter, merged_small, tiny_model_dir,
                                                                          tmp_path, capsys):  # fmt: skip
    from gemma_sft.commands import serve

    merged_dir = Path(shutil.copytree(merged_small, tmp_path / "merged"))
    assert serve.main(["--adapter", str(small_adapter), "--engine", "vllm", "--merged", str(merged_dir)]) == 0
    out = capsys.readouterr().out
    assert "config and weight names are what vLLM's and transformers' Gemma 3 loaders expect" in out
    assert f"vllm serve {tiny_model_dir} --enable-lora --lora-modules small={small_adapter} --max-lora-rank 8" in out
    assert f"--chat-template {small_adapter / 'chat_template.jinja'} --host 127.0.0.1 --port 8000" in out
    assert f"vllm serve {merged_dir} --served-model-name small --max-model-len 4096" in out
    (merged_dir / "generation_config.json").write_text("{}")
    line = refusal("--adapter", small_adapter, "--engine", "vllm", "--merged", merged_dir)
    assert "would not load in vLLM or transformers" in line and "<end_of_turn>" in line


def test_serve_is_a_verb():
    from gemma_sft.commands import MODULES, VERBS

    assert "serve" in VERBS and MODULES["serve"] == "serve"
