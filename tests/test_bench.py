"""bench.py's clock (warm-up steps timed one by one, the steady steps as one window waited for only at its ends) and
its empty kernel caches."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

spec = importlib.util.spec_from_file_location("bench", Path(__file__).resolve().parent.parent / "bench" / "bench.py")
bench = importlib.util.module_from_spec(spec)
sys.modules.setdefault("bench", bench)
spec.loader.exec_module(bench)


def test_the_steady_window_covers_the_steps_after_the_warm_up_and_waits_only_at_its_ends(monkeypatch):
    waits, now = [], [0.0]
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: waits.append(state.global_step))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    state = SimpleNamespace(global_step=0, seen=0)
    clock = bench.StepClock(warmup=2, steps=6, read_tokens=lambda s: s.seen)
    durations = [5.0, 2.0, 1.0, 1.0, 1.5, 0.5]  # compilation in the first step; 4 steady steps take 4 s
    for step, seconds in enumerate(durations, start=1):
        clock.begin(state)
        now[0] += seconds
        state.global_step, state.seen = step, state.seen + 1000
        clock.end(state)
        now[0] += 0.25  # between steps (the next batch, a log): inside the window, outside a warm-up step
    assert waits == [0, 1, 1, 2, 6]  # each warm-up step at both ends (the second one's end starts the window), its end
    assert clock.times == [5.0, 2.0] and clock.tokens == [1000, 1000]
    assert clock.window_s == pytest.approx(
        4.0 + 4 * 0.25
    )  # four steps, each after its gap, and clock.window_tokens == 4000
    tok_s, warmup_excess, per_step = clock.steady()
    assert tok_s == pytest.approx(4000 / 5.0)
    assert warmup_excess == pytest.approx(5.0 + 2.0 - 2 * 1000 / tok_s)
    assert per_step == 1000


def test_empty_caches_give_a_set_up_new_empty_kernel_cache_folders(tmp_path):
    stale = tmp_path / "ours" / "triton" / "kernel.cubin"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an earlier run")
    env = bench.empty_caches(tmp_path / "ours")
    assert set(env) == {"TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "UNSLOTH_COMPILE_LOCATION",
                        "UNSLOTH_MEGA_CACHE_DIR"}  # fmt: skip
    assert all(Path(folder).is_relative_to(tmp_path / "ours") for folder in env.values())
    assert all(Path(folder).is_dir() and not any(Path(folder).iterdir()) for folder in env.values())


def test_cached_kernels_are_the_cubin_files_of_the_emptied_caches_only(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert bench.cached_kernels() is None  # the default caches are not looked up: no count, rather than zero
    env = bench.empty_caches(tmp_path / "ours")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = bench.cached_kernels()
    triton = Path(env["TRITON_CACHE_DIR"]) / "A1B2" / "_down_kernel.cubin"
    inductor = Path(env["TORCHINDUCTOR_CACHE_DIR"]) / "triton" / "0" / "C3" / "triton_tem_fused_0.cubin"
    for path in (triton, inductor, triton.with_suffix(".json")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    assert before == set() and bench.cached_kernels() == {triton, inductor}


def test_the_work_files_are_reused_only_when_their_stamps_match(tmp_path, monkeypatch):
    built = []

    def fake_checkpoint(folder, tokenizer_dir, model_config):
        folder.mkdir()
        (folder / "model.safetensors").write_text(model_config.read_text())
        built.append(folder.name)

    monkeypatch.setattr(bench, "build_checkpoint", fake_checkpoint)
    config = tmp_path / "tiny.config.json"
    config.write_text('{"hidden_size": 8}')
    work = tmp_path / "work"
    checkpoint, data = bench.ensure_work_files(work, config, tmp_path)
    rows = data.read_text(encoding="utf-8")
    assert built == ["tiny-random.partial"] and checkpoint == work / "tiny-random" and len(rows.splitlines()) == 3000
    assert not any(path.name.endswith(".partial") for path in work.iterdir())

    bench.ensure_work_files(work, config, tmp_path)  # whole and stamped: reused
    assert len(built) == 1 and data.read_text(encoding="utf-8") == rows

    config.write_text('{"hidden_size": 16}')  # another architecture under the same name
    bench.ensure_work_files(work, config, tmp_path)
    assert len(built) == 2 and (checkpoint / "model.safetensors").read_text() == '{"hidden_size": 16}'

    (checkpoint / "model.safetensors").write_text('{"hidden')  # a file cut short, the stamp intact
    data.write_text(rows[:1000], encoding="utf-8")
    bench.ensure_work_files(work, config, tmp_path)
    assert len(built) == 3 and data.read_text(encoding="utf-8") == rows

    (checkpoint / "bench-stamp.json").unlink()  # a checkpoint whose writing was cut short before its stamp
    data.with_name(data.name + ".stamp.json").write_text("{", encoding="utf-8")
    bench.ensure_work_files(work, config, tmp_path)
    assert len(built) == 4 and data.read_text(encoding="utf-8") == rows
