"""An exported adapter behind an OpenAI-compatible endpoint, on existing engines: llama-cpp-python's server over the
GGUF file on any machine, and the vLLM command lines for a CUDA GPU.

llama-cpp-python's server (FastAPI + uvicorn) serves /v1/chat/completions, /v1/completions and /v1/models. It runs
one request at a time and queues the others; set up as it ships, it would cut a streamed answer short whenever
another request arrives (interrupt_requests) and keep a row of logits for every position of the context
(logits_all), both turned off here. OpenAIRequests, in front of it, only checks and completes request bodies.
"""

import json
import os
import socket
from pathlib import Path

from gemma_sft import UserError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_CONTEXT = 4096  # for adapters whose recipe names no max_length
# Gemma 3's recommended sampling (the exported Modelfile's too) and no repeat penalty, for requests that leave them
# out: llama-cpp-python's own defaults (temperature 0.8, top_k 40, min_p 0.05, repeat_penalty 1.1) would make
# `temperature=0` something other than the model's greedy answer, unlike OpenAI's API.
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 64, "top_p": 0.95, "min_p": 0.0, "repeat_penalty": 1.0}
ROLES = ("system", "user", "assistant")  # the roles Gemma 3's chat template knows
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def server_missing() -> str | None:
    """Why llama.cpp's server cannot run here, or None."""
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as error:
        return (
            f"llama.cpp's server is not installed here ({error}): `make serve` installs it "
            "(or `pip install -r requirements-llama-cpp.txt`)"
        )
    return None


def find_gguf(path: str | os.PathLike) -> Path:
    """The .gguf file at `path`, or the one inside the export folder `path`."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path
    files = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(files) != 1:
        found = "no .gguf file" if not files else f"{len(files)} .gguf files"
        raise UserError(f"{path}: {found} there; pass --gguf with an export.py folder or a .gguf file")
    return files[0]


def check_port_free(host: str, port: int) -> None:
    """Fail in one line before the model loads, rather than with the web server's traceback after."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"cannot listen on {host}:{port} ({error.strerror or error}); pass --port") from None


def host_warning(host: str, port: int, api_key: str | None) -> str | None:
    if host in LOCAL_HOSTS:
        return None
    if api_key:
        return f"warning: {host}:{port} speaks plain HTTP: the API key and every prompt and answer travel unencrypted"
    return f"warning: the server has no API key (--api_key) and anyone who can reach {host}:{port} can use it"


def gguf_facts(gguf: Path) -> dict:
    """The chat template and trained context length stored in the file (llama.cpp reads only the vocabulary)."""
    import llama_cpp

    from gemma_sft.export.verify import quiet_stderr

    with quiet_stderr():  # llama.cpp's notes about a context it will not use
        llm = llama_cpp.Llama(os.fspath(gguf), vocab_only=True, verbose=False)
    try:
        meta = llm.metadata
        return {
            "chat_template": meta.get("tokenizer.chat_template"),
            "context_length": int(meta.get(f"{meta.get('general.architecture', 'gemma3')}.context_length", 0)),
        }
    finally:
        llm.close()


def adapter_facts(adapter_dir: Path) -> dict:
    """What the server takes from the adapter's folder: its name, chat template and training length."""
    from gemma_sft import models

    recipe = models.read_adapter_recipe(adapter_dir)  # a missing or unfinished adapter fails here
    tokenizer = models.read_tokenizer(str(adapter_dir))
    return {
        "name": adapter_dir.resolve().name,
        "chat_template": tokenizer.chat_template,
        "max_length": recipe.get("max_length"),
        "rank": json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get("r"),
    }


def build_app(gguf: Path, name: str, context: int, threads: int, chat_template: str, api_key: str | None = None):
    """llama-cpp-python's OpenAI-compatible app for `gguf` (its chat template, <end_of_turn> as the end of an
    answer), wrapped in OpenAIRequests."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from gemma_sft.export.verify import quiet_stderr

    server = ServerSettings(api_key=api_key, interrupt_requests=False)
    model = ModelSettings(
        model=os.fspath(gguf), model_alias=name, n_ctx=context, n_threads=threads, n_threads_batch=threads,
        logits_all=False, chat_format=None, verbose=False,  # chat_format None: the template stored in the file
    )  # fmt: skip
    with quiet_stderr():  # llama.cpp's notes from C while it loads, e.g. about its sliding-window cache
        app = create_app(server_settings=server, model_settings=[model])
    # Renders exactly as the server will (same class, same template), to refuse what the template refuses up front
    formatter = Jinja2ChatFormatter(template=chat_template, eos_token="<eos>", bos_token="<bos>")
    return OpenAIRequests(app, name, formatter, api_key)


class OpenAIRequests:
    """ASGI middleware in front of llama-cpp-python's app: a completion request that is not valid JSON, does not
    match the API's schema, or has messages the chat template refuses gets OpenAI's 400 error object here (the
    server itself answers such requests with a 500); requests that leave the sampling settings or the model out
    get SAMPLING_DEFAULTS and the served name (not the file's path)."""

    def __init__(self, app, name: str, formatter, api_key: str | None = None):
        from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest

        self.app, self.name, self.formatter = app, name, formatter
        self.authorization = f"Bearer {api_key}".encode() if api_key else None
        self.schemas = {
            "/v1/chat/completions": CreateChatCompletionRequest,
            "/v1/completions": CreateCompletionRequest,
        }

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.schemas:
            return await self.app(scope, receive, send)
        if self.authorization and dict(scope["headers"]).get(b"authorization") != self.authorization:
            return await self.app(scope, receive, send)  # the server's own 401, before anything is said about the body
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body, more = body + message.get("body", b""), message.get("more_body", False)
        try:
            request = self.check(scope["path"], body)
        except ValueError as error:
            return await _send_error(send, str(error))
        body = json.dumps(request, ensure_ascii=False).encode("utf-8")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(dict(scope, headers=headers), replay, send)

    def check(self, path: str, body: bytes) -> dict:
        """The request, completed; ValueError with the reason where it is malformed."""
        from pydantic import ValidationError

        try:
            request = json.loads(body)
        except ValueError as error:
            raise ValueError(f"the request body is not valid JSON ({error})") from None
        if not isinstance(request, dict):
            raise ValueError("the request body must be a JSON object")
        if path == "/v1/chat/completions":
            messages = request.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ValueError("'messages' must be a non-empty list")
            for index, message in enumerate(messages):
                if not isinstance(message, dict) or message.get("role") not in ROLES:
                    raise ValueError(f"messages[{index}]: 'role' must be one of {', '.join(ROLES)}")
        for key, value in SAMPLING_DEFAULTS.items():
            if request.get(key) is None:
                request[key] = value
        request["model"] = request.get("model") or self.name
        try:
            self.schemas[path].model_validate(request)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"{where}: {first['msg']}") from None
        if path == "/v1/chat/completions":
            try:
                self.formatter(messages=request["messages"])
            except Exception as error:  # the template's raise_exception and Jinja's errors: the messages, not us
                raise ValueError(f"the chat template refuses these messages: {error}") from None
        return request


async def _send_error(send, message: str, status: int = 400) -> None:
    """OpenAI's error object, which its clients turn into BadRequestError with this message."""
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    payload = json.dumps({"error": error}, ensure_ascii=False).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def vllm_commands(adapter_dir: Path, merged_dir: Path, name: str, context: int, rank: int, host: str,
                  port: int) -> list[str]:  # fmt: skip
    """vLLM's server for a CUDA GPU, two ways: the base model with the adapter kept apart (--enable-lora; clients
    ask for model `name`), or the merged folder (merge.py) as a model of its own."""
    from gemma_sft import models

    base, _ = models.adapter_base(adapter_dir)
    base = models.resolve_model(base)
    rank = next((size for size in VLLM_LORA_RANKS if size >= rank), rank)
    where = f"--host {host} --port {port}"
    return [
        f"vllm serve {base} --enable-lora --lora-modules {name}={adapter_dir} --max-lora-rank {rank} "
        f"--max-model-len {context} --chat-template {adapter_dir / 'chat_template.jinja'} {where}",
        f"vllm serve {merged_dir} --served-model-name {name} --max-model-len {context} {where}",
    ]
