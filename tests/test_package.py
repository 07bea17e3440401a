"""The package as a user installs and drives it: the wheel, the `gemma-sft` command, and the verbs after training
finding the adapter that training wrote."""

import os
import subprocess
import sys
import zipfile

import pytest

from gemma_sft import REPO_ROOT
from gemma_sft.hardware import DEMO, LOW_MEMORY, MISSION, trained_adapter


@pytest.mark.parametrize(
    ("cuda", "gib", "recipe", "adapter"),
    [
        (False, 0.0, None, "outputs/gemma3-270m-belle-demo"),
        (True, 24.0, None, "outputs/gemma3-4b-belle-qlora"),
        (True, 12.0, None, "outputs/gemma3-4b-belle-qlora"),
        (True, 24.0, DEMO, "outputs/gemma3-270m-belle-demo"),
        (False, 0.0, MISSION, "outputs/gemma3-4b-belle-qlora"),
    ],
)
def test_the_verbs_after_training_use_the_adapter_training_wrote(cuda, gib, recipe, adapter, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    assert trained_adapter(recipe, cuda, gib) == adapter
    for path in (DEMO, MISSION, LOW_MEMORY):  # each recipe's own output_dir, read from the file
        assert trained_adapter(path, cuda, gib) in (REPO_ROOT / path).read_text()


@pytest.mark.parametrize(
    ("recipe", "adapter"), [(MISSION, "outputs/gemma3-4b-belle-qlora"), (DEMO, "outputs/gemma3-270m-belle-demo")]
)
def test_make_eval_after_make_train_scores_that_adapter(recipe, adapter):
    for verb, script in (("eval", "evaluate.py"), ("chat", "chat.py"), ("export", "export.py")):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}  # also when run by `make test`
        result = subprocess.run(["make", "-s", "-n", verb, f"RECIPE={recipe}"], cwd=REPO_ROOT, capture_output=True,
                                text=True, env=env)  # fmt: skip
        command = next((line for line in result.stdout.splitlines() if script in line), result.stdout)
        assert f"{script} --adapter {adapter}" in command, command


def test_the_gemma_sft_command_lists_its_verbs_and_refuses_an_unknown_one():
    listed = subprocess.run([sys.executable, "-m", "gemma_sft.cli", "--help"], capture_output=True, text=True)
    assert listed.returncode == 0 and all(
        verb in listed.stdout for verb in ("train", "eval", "chat", "merge", "export")
    )
    wrong = subprocess.run([sys.executable, "-m", "gemma_sft.cli", "trian"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "unknown verb 'trian'" in wrong.stderr
    missing = subprocess.run([sys.executable, "-m", "gemma_sft.cli", "eval", "--adapter", "/nonexistent"],
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr


def test_the_wheel_carries_the_chat_template_and_the_command(tmp_path):
    """`pip install .` gives a working package outside the checkout: the template is package data."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO_ROOT)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = tmp_path.glob("gemma_sft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gemma_sft/chat_templates/gemma3.jinja" in names
    assert {"gemma_sft/data/__init__.py", "gemma_sft/patches/registry.py", "gemma_sft/export/merge.py"} <= set(names)
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "gemma-sft = gemma_sft.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_an_installed_copy_finds_the_template_from_any_folder(tmp_path, monkeypatch):
    from gemma_sft.models import DEFAULT_CHAT_TEMPLATE, read_chat_template

    monkeypatch.chdir(tmp_path)  # no chat_templates/ here: the recipe's relative path falls back to package data
    assert read_chat_template("chat_templates/gemma3.jinja") == DEFAULT_CHAT_TEMPLATE.read_text(encoding="utf-8")


def test_every_make_target_is_phony_and_on_the_users_page():
    import re

    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.MULTILINE))
    phony = set(re.search(r"^\.PHONY:(.*)$", makefile, flags=re.MULTILINE).group(1).split())
    assert targets == phony
    missing = [t for t in sorted(targets) if f"make {t}" not in readme and f"`{t}`" not in readme]
    assert not missing, f"Makefile targets missing from README.md: {missing}"
    assert len(readme.splitlines()) <= 220  # the user's page; method and history live in docs/


def test_every_patch_switch_is_named_on_the_users_page_and_in_the_levers_table():
    from gemma_sft.patches import PATCHES

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    levers = (REPO_ROOT / "docs" / "PERFORMANCE.md").read_text(encoding="utf-8")
    missing = [p.switch for p in PATCHES if f"`{p.switch}`" not in readme or f"| `{p.switch}` |" not in levers]
    assert not missing, f"patch switches missing from README.md or docs/PERFORMANCE.md's table: {missing}"
