"""The comparison page (webui.py): its streamed generation helper, its one-line errors, and the page itself driven in
headless Chromium against a server on the tiny adapter."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import run_script

from gemma_sft import REPO_ROOT

pytestmark = pytest.mark.train  # every test here trains a model or uses a trained one

# Greedy answers of the tiny model to this prompt differ with and without its adapter (checked in
# test_base_and_adapter_answers_differ), so the two panes must differ too.
PROMPT = "计算 7 加 12 等于多少？"
FOLLOW_UP = "再算一遍 8 加 9。"
# Headless Chromium as root in a container, with nothing fetched in the background (updates, sync, QUIC probes).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000")  # fmt: skip
TOKENS = 24  # a short answer keeps the browser test quick; the tiny model rarely stops by itself


@pytest.fixture(scope="module")
def loaded(tiny_adapter):
    from gemma_sft import models

    model, tokenizer, _ = models.load_for_inference(tiny_adapter)
    return model, tokenizer


def greedy_text(model, tokenizer, messages, use_base=False, max_new_tokens=TOKENS) -> str:
    """The answer from one plain (unstreamed) greedy `generate`."""
    import torch

    from gemma_sft.models import stop_token_ids

    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with model.disable_adapter() if use_base else contextlib.nullcontext(), torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=stop_token_ids(tokenizer))  # fmt: skip
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def test_streamed_pieces_join_to_the_greedy_answer(loaded):
    from gemma_sft.inference.generate import build_messages, stream_reply

    model, tokenizer = loaded
    messages = build_messages(None, [], PROMPT)
    for use_base in (False, True):
        pieces = list(stream_reply(model, tokenizer, messages, use_base=use_base, max_new_tokens=TOKENS))
        assert len(pieces) > 1, "the answer came in one piece: not streamed"
        assert "".join(pieces) == greedy_text(model, tokenizer, messages, use_base=use_base)


def test_base_and_adapter_answers_differ(loaded):
    from gemma_sft.inference.generate import build_messages, stream_reply

    model, tokenizer = loaded
    messages = build_messages(None, [], PROMPT)
    adapter = "".join(stream_reply(model, tokenizer, messages, use_base=False, max_new_tokens=TOKENS))
    base = "".join(stream_reply(model, tokenizer, messages, use_base=True, max_new_tokens=TOKENS))
    assert base.strip() and adapter.strip()
    assert base != adapter
    # the adapter is on again after a base answer
    assert "".join(stream_reply(model, tokenizer, messages, use_base=False, max_new_tokens=TOKENS)) == adapter


def test_an_early_stop_releases_the_model(loaded):
    """A reader that stops early (a closed tab, Reset) must not leave generation running or the model locked."""
    from gemma_sft.inference.generate import MODEL_LOCK, build_messages, stream_reply

    model, tokenizer = loaded
    stream = stream_reply(model, tokenizer, build_messages(None, [], PROMPT), use_base=True, max_new_tokens=2000)
    next(stream)
    stream.close()
    assert not MODEL_LOCK.locked()


def test_history_is_carried_into_the_next_prompt(loaded):
    from gemma_sft.inference.generate import build_messages, render_prompt

    _, tokenizer = loaded
    history = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "7 + 12 = 19。"}]
    text = render_prompt(tokenizer, build_messages("你是一个简洁的助手。", history, FOLLOW_UP))
    positions = [text.find(part) for part in ("你是一个简洁的助手。", PROMPT, "7 + 12 = 19。", FOLLOW_UP)]
    assert -1 not in positions and positions == sorted(positions), text
    assert text.count("<bos>") == 1
    assert text.endswith("<start_of_turn>model\n")


def test_no_adapter_is_one_line_error(tmp_path):
    result = run_script("webui.py", "--adapter", tmp_path, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}: no finished adapter here (adapter_config.json missing); train one with sft.py"
    ]


def test_port_in_use_is_one_line_error(tiny_adapter):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_script("webui.py", "--adapter", tiny_adapter, "--port", port, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot listen on 127.0.0.1:{port}"), result.stderr


# --- the page in a browser ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def browser_paths() -> tuple[str, str]:
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no Chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)")
    return chromium, driver


@pytest.fixture
def server(tmp_path):
    """webui.py on a free local port, as a user starts it; killed at the end, whatever happens."""

    def start(adapter: Path, max_new_tokens: int = TOKENS) -> str:
        port = free_port()
        log = open(tmp_path / "webui.log", "w")  # noqa: SIM115 (closed with the process below)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        process = subprocess.Popen(
            [sys.executable, "webui.py", "--adapter", str(adapter), "--port", str(port),
             "--max_new_tokens", str(max_new_tokens)],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        started.append((process, log))
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 300  # loading the model on a busy 2-core machine
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"webui.py exited with {process.returncode}:\n{(tmp_path / 'webui.log').read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return url
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"webui.py did not answer at {url} within 300 s:\n{(tmp_path / 'webui.log').read_text()}")

    started: list = []
    try:
        yield start
    finally:
        for process, log in started:
            process.kill()
            process.wait(timeout=30)
            log.close()


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = browser_paths()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):  # a fresh profile each time
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request, for `outside_requests`
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def pane_answers(driver, pane: str) -> list[str]:
    """The text of each answer (bot message) in one chat pane, in order."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(`#${arguments[0]} [data-testid='bot']`))"
        ".map(node => node.innerText.trim());",
        pane,
    )


def wait_for(driver, condition, what: str, timeout: float = 300):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: condition(d))
    except TimeoutException:
        pytest.fail(f"timed out after {timeout} s waiting for {what}; status: {status_text(driver)!r}")


def status_text(driver) -> str:
    return driver.execute_script("const s = document.querySelector('#status'); return s ? s.innerText : '';")


def ask(driver, prompt: str, turn: int, enter: bool = False) -> tuple[list[str], list[str]]:
    """Type a prompt, press Send (or Enter in the box), and wait until the turn is answered in both panes."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
    box.clear()
    box.send_keys(prompt)
    if enter:
        box.send_keys(Keys.ENTER)
    else:
        driver.find_element(By.CSS_SELECTOR, "#send").click()
    wait_for(driver, lambda d: f"Turn {turn} answered" in status_text(d), f"turn {turn} to be answered")
    answers = {pane: pane_answers(driver, pane) for pane in ("base-chat", "adapter-chat")}
    return answers["base-chat"], answers["adapter-chat"]


def outside_requests(driver, url: str) -> list[str]:
    """The requests the page made so far to anywhere but the local server (fonts, analytics, CDNs)."""
    import json

    sent = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    urls = [event["params"]["request"]["url"] for event in sent if event["method"] == "Network.requestWillBeSent"]
    # chrome:// pages are the browser's own (its new-tab page before the first visit), not the page's
    network = [u for u in urls if u.startswith(("http:", "https:", "ws:", "wss:"))]
    assert network, "no request was logged: the check would see nothing"
    return [u for u in network if not u.startswith((url, url.replace("127.0.0.1", "localhost")))]


def screenshot_path(tmp_path) -> Path:
    path = Path(os.environ.get("WEBUI_SCREENSHOT") or tmp_path / "webui.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_page_compares_base_and_adapter(request, server, browser, tmp_path):
    """Also makes the README's picture: WEBUI_ADAPTER (a real adapter, then the tiny one is not trained), WEBUI_PROMPT,
    WEBUI_FOLLOW_UP and WEBUI_MAX_NEW_TOKENS change what it shows, WEBUI_SCREENSHOT where it goes."""
    from selenium.webdriver.common.by import By

    adapter = Path(os.environ.get("WEBUI_ADAPTER") or request.getfixturevalue("tiny_adapter"))
    first = os.environ.get("WEBUI_PROMPT") or PROMPT
    follow_up = os.environ.get("WEBUI_FOLLOW_UP") or FOLLOW_UP
    url = server(adapter, int(os.environ.get("WEBUI_MAX_NEW_TOKENS") or TOKENS))
    browser.get(url)
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt textarea"), "the page to load", 120)

    base, tuned = ask(browser, first, turn=1)
    assert len(base) == len(tuned) == 1 and base[0] and tuned[0], (base, tuned)
    assert base != tuned, "greedy answers with and without the adapter should differ"

    base, tuned = ask(browser, follow_up, turn=2, enter=True)
    assert len(base) == len(tuned) == 2 and all(base + tuned), (base, tuned)
    users = browser.find_elements(By.CSS_SELECTOR, "#base-chat [data-testid='user']")
    assert [u.text.strip() for u in users] == [first, follow_up]
    height = browser.execute_script("return document.documentElement.scrollHeight;")
    browser.set_window_size(1400, max(1000, min(height, 2400)))  # the whole page in the picture, settings included
    browser.save_screenshot(str(screenshot_path(tmp_path)))

    browser.find_element(By.CSS_SELECTOR, "#reset").click()
    wait_for(browser, lambda d: not pane_answers(d, "base-chat") and not pane_answers(d, "adapter-chat"),
             "Reset to empty both panes", 60)  # fmt: skip

    tab = next(b for b in browser.find_elements(By.CSS_SELECTOR, "button[role='tab']") if b.text.strip() == "Report")
    tab.click()
    wait_for(browser, lambda d: "answer loss" in d.find_element(By.CSS_SELECTOR, "#report").text,
             "the report to show", 60)  # fmt: skip
    curve_loaded = "const i = document.querySelector('#loss-curve img'); return !!i && i.complete && i.naturalWidth;"
    wait_for(browser, lambda d: d.execute_script(curve_loaded), "the loss curve to show", 60)
    assert outside_requests(browser, url) == [], "the page must work offline, fetching nothing from outside"


def test_report_parts(tiny_adapter, tmp_path):
    from gemma_sft.commands import webui

    text, curve = webui.report_parts(tiny_adapter)
    assert "answer loss" in text and "](loss_curve.png)" not in text  # the image is shown apart, not as a dead link
    assert curve == tiny_adapter / "loss_curve.png"
    bare = tmp_path / "bare"
    shutil.copytree(tiny_adapter, bare, ignore=shutil.ignore_patterns("report.md", "loss_curve.png"))
    text, curve = webui.report_parts(bare)
    assert text.startswith(f"**No report for `{bare}` yet.**") and curve is None
