"""Throughput of `serve.py` (llama.cpp's OpenAI-compatible server over the GGUF export): requests/s and generated
tokens/s with 1, 4 and 8 clients asking at once, through the official openai client.

    python bench/serve_bench.py                                    # the embedded Gemma 3 270M, f16, all cores
    python bench/serve_bench.py --adapter DIR [--gguf DIR] [--type q8_0] [--threads 2] [--output FILE]

Without --adapter, a LoRA adapter that changes nothing (PEFT's zero-initialised B) on the embedded 270M is made
and exported: a merged adapter has the base's shapes, so the speed is that of any adapter on it. Each client sends
its share of --requests chat completions (Chinese instructions from data/belle_eval_zh.jsonl, greedy, at most
--max_tokens tokens each) one after another; the server answers one request at a time, so more clients add
waiting, not speed. Writes bench/results/DATE-MACHINE-serve-270m-TYPE.json (or --output).
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def unchanged_adapter(folder: Path) -> Path:
    """A LoRA adapter on the embedded 270M, saved as sft.py saves one, whose B matrices are zero."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gemma_sft.models import embedded, load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(embedded.model_dir())
    get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).save_pretrained(folder)
    load_tokenizer(str(embedded.model_dir())).save_pretrained(folder)
    recipe = {"model_name_or_path": embedded.EMBEDDED_MODEL, "max_length": 1024}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return folder


def run(*args) -> None:
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(map(str, args))} failed:\n{result.stderr[-2000:]}")
    print(result.stdout.strip())


@contextlib.contextmanager
def server(adapter: Path, gguf: Path, threads: int, log: Path):
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "serve.py", "--adapter", str(adapter), "--gguf", str(gguf), "--port", str(port),
             "--threads", str(threads)], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            if process.poll() is not None:
                sys.exit(f"serve.py stopped:\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(60)


def measure(client, prompts: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    def one(index: int) -> tuple[float, int, int]:
        started = time.perf_counter()
        answer = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": prompts[index % len(prompts)]}],
            temperature=0, max_tokens=max_tokens,
        )  # fmt: skip
        return time.perf_counter() - started, answer.usage.completion_tokens, answer.usage.prompt_tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    latencies = sorted(seconds for seconds, _, _ in results)
    generated = sum(tokens for _, tokens, _ in results)
    return {
        "clients": clients,
        "requests": requests,
        "wall_s": round(wall, 2),
        "requests_per_s": round(requests / wall, 3),
        "generated_tokens": generated,
        "generated_tokens_per_s": round(generated / wall, 1),
        "prompt_tokens": sum(tokens for _, _, tokens in results),
        "latency_p50_s": round(statistics.median(latencies), 2),
        "latency_max_s": round(latencies[-1], 2),
    }


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="a finished sft.py run (default: an unchanged LoRA on the embedded 270M)")
    parser.add_argument("--gguf", help="its export.py folder (default: exported here)")
    parser.add_argument("--type", choices=["f16", "q8_0"], default="f16")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--machine", default=f"cpu-{len(os.sched_getaffinity(0))}core", help="for the file name")
    parser.add_argument("--output", help="result file (default: bench/results/DATE-MACHINE-serve-270m-TYPE.json)")
    args = parser.parse_args()

    import llama_cpp
    from openai import OpenAI

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    adapter = Path(args.adapter) if args.adapter else unchanged_adapter(work / "bench")
    gguf = Path(args.gguf) if args.gguf else work / "bench-gguf"
    if not args.gguf:
        run("export.py", "--adapter", adapter, "--output", gguf, "--type", args.type)
    prompts = [json.loads(line)["instruction"] for line in (ROOT / "data" / "belle_eval_zh.jsonl").open()][:32]

    levels = []
    gguf_bytes = sum(f.stat().st_size for f in Path(gguf).glob("*.gguf"))
    try:
        with server(adapter, gguf, args.threads, work / "serve.log") as url:
            client = OpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=3600)
            measure(client, prompts, 1, 2, args.max_tokens)  # warm-up: first loads, caches
            for clients in args.clients:
                levels.append(measure(client, prompts, clients, args.requests, args.max_tokens))
                print(json.dumps(levels[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the made adapter and its export: half a gigabyte

    date = datetime.date.today().isoformat()
    result = {
        "what": "serve.py (llama-cpp-python's OpenAI-compatible server) over the embedded Gemma 3 270M GGUF",
        "command": "python bench/serve_bench.py " + " ".join(sys.argv[1:]),
        "date": date,
        "machine": machine() | {"name": args.machine},
        "engine": {
            "llama_cpp_python": llama_cpp.__version__,
            "threads": args.threads,
            "type": args.type,
            "gguf_bytes": gguf_bytes,
        },
        "request": {"max_tokens": args.max_tokens, "temperature": 0, "prompts": "data/belle_eval_zh.jsonl"},
        "levels": levels,
    }
    output = Path(args.output or ROOT / "bench" / "results" / f"{date}-{args.machine}-serve-270m-{args.type}.json")
    output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"written {output}")


if __name__ == "__main__":
    main()
