"""The web UI, driven in headless Chromium (Debian's package; `make browser` installs it).

The server is the real `tunesmith webui` command; training and export run as the real
`tunesmith train|export` subprocesses it starts. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, build_tiny_model

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts"
# Set to refresh the README's screenshot of the Train tab during a run.
DOCS_SCREENSHOT = os.environ.get("TUNESMITH_DOCS_SCREENSHOT") == "1"


def _require_browser() -> None:
    pytest.importorskip("gradio")
    pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} not found: `make browser` installs Debian's chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def webui(tmp_path_factory) -> Iterator[str]:
    """A real `tunesmith webui` server on a free local port; yields its URL."""
    _require_browser()
    cwd = tmp_path_factory.mktemp("webui-cwd")
    # The tests' folders all lie under pytest's base temporary folder: the workspace root.
    server, url = _start_webui(cwd, ["--root", str(tmp_path_factory.getbasetemp())])
    yield url
    _stop(server)


def _start_webui(cwd: Path, args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """A real `tunesmith webui` on a free local port, its output in cwd/server.log; (process, URL)."""
    import urllib.error
    import urllib.request

    port = _free_port()
    env = dict(env or os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    with open(cwd / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "tunesmith", "webui", "--port", str(port), *args], cwd=cwd,
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except urllib.error.HTTPError:  # answered (a login page or a refusal): it is up
            break
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            pytest.fail("the web UI did not start:\n" + (cwd / "server.log").read_text(errors="replace"))
        time.sleep(0.5)
    return server, url


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.fixture(scope="module")
def browser(webui) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # Playwright gives each launch a fresh temporary profile (the --user-data-dir).
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser, webui) -> Iterator[object]:
    """A page that may reach only the local server: anything else is refused and recorded."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    outside: list[str] = []

    def only_local(route) -> None:
        url = route.request.url
        if url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(webui)
    page.wait_for_selector("#train-start")
    yield page
    context.close()
    assert outside == [], f"the page tried to reach the internet: {outside}"


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def _fill(page, elem_id: str, value: object) -> None:
    """Type into a Textbox, Number or Dropdown by its elem_id and leave the field (Gradio commits on blur)."""
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=checkbox])").first
    box.fill(str(value))
    box.press("Tab")


def _choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()
    page.keyboard.press("Escape")


def _open(page, section: str) -> None:
    page.get_by_text(section, exact=True).click()


def _text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def _wait_text(page, elem_id: str, pattern: str, timeout: float = 60) -> str:
    """Wait until the element's text matches the regex; return the text."""
    deadline = time.time() + timeout
    text = ""
    while time.time() < deadline:
        text = _text(page, elem_id)
        if re.search(pattern, text):
            return text
        page.wait_for_timeout(250)
    raise AssertionError(f"#{elem_id} never matched {pattern!r}; it shows:\n{text}")


def _dataset_dir(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps({Path(f).stem: {"file_name": f} for f in files}))
    for name, source in files.items():
        shutil.copy(source, folder / name)
    return folder


def test_train_watch_chat_export_in_the_browser(page, tmp_path, default_model_dir, repo_data):
    from tunesmith.ui.runs import CONSOLE_FILE

    model_dir = build_tiny_model(tmp_path / "tiny", default_model_dir)
    data_dir = _dataset_dir(tmp_path / "data", {"identity.json": str(repo_data / "identity.json")})
    run_dir = tmp_path / "run"

    # --- Train: model, data (with its preview), hyper-parameters, output folder
    assert page.locator("#train-model_name_or_path input").input_value() == "smollm2-135m-instruct"
    assert page.locator("#train-learning_rate input").input_value() == "0.00005"  # the schema's default
    _fill(page, "train-model_name_or_path", model_dir)
    _fill(page, "train-dataset_dir", data_dir)
    _wait_text(page, "train-preview-note", r"1 dataset\(s\)")
    _choose(page, "train-dataset", "identity")
    _wait_text(page, "train-preview-note", r"First 5 rows of identity")
    assert "I am {{name}}, an AI assistant developed by {{author}}" in _text(page, "train-preview")
    steps = 300 if DOCS_SCREENSHOT else 40  # a longer run leaves time for the screenshot
    for key, value in {"learning_rate": 0.002, "max_steps": steps, "cutoff_len": 256, "max_samples": 24}.items():
        _fill(page, f"train-{key}", value)
    _open(page, "Evaluation and logging")
    _fill(page, "train-val_size", 4)
    _choose(page, "train-eval_strategy", "steps")
    _fill(page, "train-eval_steps", 10)
    _fill(page, "train-logging_steps", 2)
    _fill(page, "train-save_steps", 0)
    _fill(page, "train-output_dir", run_dir)

    page.click("#train-preview-yaml")
    _wait_text(page, "train-yaml", rf"max_steps: {steps}")
    page.click("#train-start")
    _wait_text(page, "train-message", r"Started")

    # --- the run: progress and a live loss curve, then the end
    text = _wait_text(page, "train-status", rf"Running .*step \d+ / {steps}|Finished", timeout=90)
    if "Running" in text:
        page.wait_for_selector("#train-plot img", state="attached")
        _shot(page, "webui-train-running.png")
    if DOCS_SCREENSHOT:
        _wait_text(page, "train-status", r"Running .*step (?:[4-9]\d|\d{3}) / ")
        page.wait_for_timeout(1500)
        _docs_screenshot(page)
    text = _wait_text(page, "train-status", r"Finished|Failed|Stopped", timeout=120)
    assert "Finished" in text and f"step {steps} / {steps}" in text, text
    page.wait_for_selector("#train-plot img", state="attached")
    assert (run_dir / "adapter_model.safetensors").is_file()
    assert (run_dir / "train_results.json").is_file()

    # --- Monitor: the same run, its console captured in output_dir
    page.get_by_role("tab", name="Monitor").click()
    assert page.locator("#monitor-dir textarea, #monitor-dir input").first.input_value() == str(run_dir.resolve())
    _wait_text(page, "monitor-status", r"Finished")
    console = page.locator("#monitor-log textarea").input_value()
    assert "tunesmith train" in console and "Saved the trained adapter" in console
    assert "Saved the trained adapter" in (run_dir / CONSOLE_FILE).read_text()
    page.wait_for_selector("#monitor-plot img", state="attached")
    _shot(page, "webui-monitor.png")

    # --- a reloaded page finds the run again (state is kept by the server, per output_dir)
    page.reload()
    page.wait_for_selector("#train-start")
    _wait_text(page, "train-status", r"Finished.*\n?.*" + re.escape(str(run_dir.resolve())))
    assert page.locator("#train-output_dir textarea, #train-output_dir input").first.input_value() == str(run_dir)

    # --- Chat: the base with the trained adapter, one streamed reply
    page.get_by_role("tab", name="Chat").click()
    _fill(page, "chat-model_name_or_path", model_dir)
    _fill(page, "chat-run", run_dir)
    page.click("#chat-load")
    _wait_text(page, "chat-info", r"Loaded the trained adapter")
    _open(page, "Generation")
    page.locator("#chat-do_sample input").uncheck()  # greedy, so the reply can be checked
    _fill(page, "chat-max_new_tokens", 12)
    _fill(page, "chat-repetition_penalty", 2.0)  # a tiny model greedily repeats a newline without it
    expected = _greedy_reply(model_dir, run_dir, "Who are you?", max_new_tokens=12, repetition_penalty=2.0)
    assert expected.strip()
    page.locator("#chat-input textarea").fill("Who are you?")
    page.locator("#chat-input textarea").press("Enter")
    page.locator("#chat-box [data-testid=user]").filter(has_text="Who are you?").wait_for()
    _wait_text(page, "chat-box", re.escape(expected.split()[-1]))  # the streamed reply, to its last word
    reply = page.locator("#chat-box [data-testid=bot]").last.inner_text()
    assert reply.split() == expected.split(), (reply, expected)
    _shot(page, "webui-chat.png")

    # --- Export: folder, shard size, dtype; verified by the export itself
    page.get_by_role("tab", name="Export").click()
    _fill(page, "export-model_name_or_path", model_dir)
    _fill(page, "export-run", run_dir)
    export_dir = tmp_path / "export"
    _fill(page, "export-export_dir", export_dir)
    _fill(page, "export-export_size", 0.005)
    _choose(page, "export-export_dtype", "bfloat16")
    page.click("#export-start")
    result = _wait_text(page, "export-result", r"Exported and verified|error", timeout=120)
    assert "Exported and verified" in result, result
    _shot(page, "webui-export.png")
    shards = sorted(p.name for p in export_dir.glob("*.safetensors"))
    assert len(shards) >= 2 and (export_dir / "model.safetensors.index.json").is_file()
    from safetensors import safe_open

    with safe_open(str(export_dir / shards[0]), "pt") as fh:
        names = fh.keys()
        assert {str(fh.get_slice(name).get_dtype()) for name in names} == {"BF16"}


def _greedy_reply(model_dir: Path, run_dir: Path, message: str, **gen: object) -> str:
    """The same model and adapter loaded by the ChatEngine `tunesmith chat` uses, in this process."""
    import torch

    from tunesmith.config import load_config
    from tunesmith.infer import ChatEngine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs (OMP_NUM_THREADS=1): the same sums, the same argmax
    try:
        engine = ChatEngine(load_config(None, {"model_name_or_path": str(model_dir), "output_dir": str(run_dir)}))
        return engine.chat([{"role": "user", "content": message}], do_sample=False, **gen)
    finally:
        torch.set_num_threads(threads)


def _docs_screenshot(page) -> None:
    """docs/webui-train.png for the README: the Train tab during a run, kept small (palette PNG)."""
    from PIL import Image

    raw = ARTIFACTS / "webui-train-docs-raw.png"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(raw))
    image = Image.open(raw).convert("RGB")
    image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
    (REPO / "docs").mkdir(exist_ok=True)
    image.quantize(colors=256).save(REPO / "docs" / "webui-train.png", optimize=True)


def test_invalid_dataset_error_shows_in_the_page(page, tmp_path, default_model_dir):
    from tunesmith.ui.runs import CONSOLE_FILE, error_text

    model_dir = build_tiny_model(tmp_path / "tiny", default_model_dir)
    data_dir = tmp_path / "bad-data"
    data_dir.mkdir()
    (data_dir / "dataset_info.json").write_text(json.dumps({"broken": {"file_name": "broken.json"}}))
    (data_dir / "broken.json").write_text('[\n  {"instruction": "hi", "output": "Hello"},\n'
                                          '  {"instruction": "who are you?"}\n]\n')
    run_dir = tmp_path / "run"

    _fill(page, "train-model_name_or_path", model_dir)
    _fill(page, "train-dataset_dir", data_dir)
    _choose(page, "train-dataset", "broken")
    _fill(page, "train-max_steps", 2)
    _fill(page, "train-output_dir", run_dir)
    page.click("#train-start")
    shown = _wait_text(page, "train-status", r"Failed", timeout=90)
    _shot(page, "webui-data-error.png")
    printed = error_text((run_dir / CONSOLE_FILE).read_text())  # what `tunesmith train` printed
    assert printed and printed.startswith("error: 1 invalid row of 2")
    assert f"{data_dir / 'broken.json'} line 3 (row 1), column 'output'" in printed
    assert "Failed (exit code 1)" in shown
    assert printed in shown, shown


def test_stop_asks_the_run_for_a_clean_stop(tmp_path, default_model_dir, repo_data):
    """Stop sends SIGINT to `tunesmith train`; the run ends non-zero and a fresh server reads the same state."""
    from tunesmith.ui.runs import RunManager

    model_dir = build_tiny_model(tmp_path / "tiny", default_model_dir)
    data_dir = _dataset_dir(tmp_path / "data", {"identity.json": str(repo_data / "identity.json")})
    config = (f"model_name_or_path: {model_dir}\ndataset: identity\ndataset_dir: {data_dir}\n"
              f"output_dir: {tmp_path / 'run'}\nmax_steps: 100000\nlogging_steps: 1\nsave_steps: 0\n"
              "cutoff_len: 128\nmax_samples: 8\n")
    runs = RunManager()
    out = runs.start(tmp_path / "run", config)
    status = _wait_status(runs, out, lambda s: s.state == "running" and (s.step or 0) >= 2 or not s.active)
    assert status.state == "running", (status, (out / "webui_train.log").read_text())
    assert runs.stop(out).state == "stopping"
    status = _wait_status(runs, out, lambda s: not s.active)
    assert status.state == "stopped" and status.returncode not in (0, None), status
    assert status.step is not None and status.step < 100000
    # A restarted server: everything comes from output_dir (the exit code lands there a moment after the exit).
    again = _wait_status(RunManager(), out, lambda s: s.returncode is not None, timeout=10)
    assert (again.state, again.returncode, again.step) == (status.state, status.returncode, status.step)


def _wait_status(runs, out: Path, done, timeout: float = 90):
    deadline = time.time() + timeout
    while True:
        status = runs.status(out)
        if done(status) or time.time() > deadline:
            return status
        time.sleep(0.2)


def test_form_fields_come_from_the_schema_and_make_the_cli_yaml(tmp_path):
    """The Train form's defaults are config.py's; what it holds validates as `tunesmith train` validates."""
    pytest.importorskip("gradio")
    from tunesmith.config import KEYS, load_config
    from tunesmith.errors import UserError
    from tunesmith.ui import form
    from tunesmith.ui.app import FORM_KEYS, WebUI

    assert set(FORM_KEYS) <= set(KEYS)
    ui = WebUI(tmp_path / "work")
    page = {key: KEYS[key].default for key in FORM_KEYS}  # what a fresh page holds
    page.update(template="auto", dataset=["identity", "alpaca_en_demo"], learning_rate=2e-4,
                max_samples="16")  # an optional number is a text box: empty = default
    _, text = ui.form_yaml(list(page.values()), "gradient_checkpointing: true\n")
    path = tmp_path / "run.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.data.dataset == ["identity", "alpaca_en_demo"] and cfg.train.learning_rate == 2e-4
    assert cfg.data.max_samples == 16 and cfg.train.gradient_checkpointing is True
    assert cfg.model.template is None and cfg.finetune.lora_alpha == 2 * cfg.finetune.lora_rank
    assert "lora_alpha" not in text  # optional keys left empty mean 'default' and are not written

    back, others = form.form_from_yaml(path, FORM_KEYS)  # Load config puts it back into the form
    assert back["learning_rate"] == 2e-4 and back["template"] == "auto" and back["max_samples"] == 16
    assert others == {"gradient_checkpointing": True}

    emptied = dict(page, cutoff_len=None)  # an emptied required number
    with pytest.raises(UserError) as err:
        ui.form_yaml(list(emptied.values()), "")
    line = 1 + next(i for i, t in enumerate(text.splitlines()) if t.startswith("cutoff_len:"))
    assert str(err.value) == f"the form, line {line}: 'cutoff_len' cannot be empty; expected int."
    with pytest.raises(UserError, match=r"unknown key 'lerning_rate' \(did you mean 'learning_rate'\?\)"):
        ui.form_yaml(list(page.values()), "lerning_rate: 0.1")


# ---------------------------------------------------------------------------------------------------
# Workspace confinement, login and Host checks, through the page's own HTTP API (gradio_client).

LOGIN = ("tester", "pw-for-tests")


class Workspace:
    def __init__(self, root: Path, outside: Path, url: str, client: object) -> None:
        self.root, self.outside, self.url, self.client = root, outside, url, client

    def call(self, api_name: str, *args: object, **kwargs: object) -> tuple:
        return self.client.predict(*args, api_name=api_name, **kwargs)

    def form(self, **values: object) -> list[object]:
        """What a fresh page's Train form holds, with `values` typed in; then the More keys text."""
        from tunesmith.ui import form
        from tunesmith.ui.app import FORM_KEYS

        page = {key: form.default(key) for key in FORM_KEYS}
        page.update(template="auto", dataset=[])
        page.update(values)
        return [page[k] for k in FORM_KEYS]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, default_model_dir) -> Iterator[Workspace]:
    """A web UI confined to root/, started elsewhere, with a login; outside/ holds files it must not touch."""
    pytest.importorskip("gradio")
    gradio_client = pytest.importorskip("gradio_client")
    base = tmp_path_factory.mktemp("workspace")
    root, outside = base / "root", base / "outside"
    (root / "configs").mkdir(parents=True)
    (outside / "data").mkdir(parents=True)
    (outside / "secret.yaml").write_text("learning_rate: 0.001\n")  # a valid config, only outside
    (outside / "data" / "dataset_info.json").write_text(json.dumps({"leak": {"file_name": "leak.json"}}))
    (outside / "data" / "leak.json").write_text(json.dumps([{"instruction": "outside-row", "output": "x"}]))
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    (root / "secret-link.yaml").symlink_to(outside / "secret.yaml")
    (root / "data").mkdir()
    (root / "data" / "dataset_info.json").write_text(
        json.dumps({"escape": {"file_name": "../../outside/data/leak.json"}}))
    env = {k: v for k, v in os.environ.items() if k != "TUNESMITH_WEBUI_AUTH"}
    server, url = _start_webui(base, ["--root", str(root), "--auth", ":".join(LOGIN)], env)
    try:
        yield Workspace(root, outside, url, gradio_client.Client(url, auth=LOGIN, verbose=False))
    finally:
        _stop(server)


def _message(result: tuple) -> str:
    """The Train tab's message from a load/save/start answer (the Markdown among its outputs)."""
    return next(v for v in result if isinstance(v, str) and v.startswith(("```text", "Saved", "Loaded", "Started")))


def test_config_paths_outside_the_root_are_refused(workspace):
    secret = workspace.outside / "secret.yaml"
    for path in ["/etc/passwd", "/etc/shadow", str(secret), "../outside/secret.yaml", "link-out/secret.yaml",
                 "secret-link.yaml", str(workspace.root / "configs" / ".." / ".." / "outside" / "secret.yaml")]:
        message = _message(workspace.call("/load_config", path))
        assert f"outside the workspace root {workspace.root}" in message, (path, message)
        assert "learning_rate" not in message and "root:" not in message
    for path in ["../outside/new.yaml", "link-out/new.yaml", str(workspace.outside / "new2.yaml")]:
        message = _message(workspace.call("/save_config", path, *workspace.form(), ""))
        assert f"outside the workspace root {workspace.root}" in message, (path, message)
    assert sorted(p.name for p in workspace.outside.iterdir()) == ["data", "secret.yaml"]  # nothing written
    message = _message(workspace.call("/save_config", "configs/mine.yaml", *workspace.form(learning_rate=0.003), ""))
    assert message.startswith("Saved")
    assert "learning_rate: 0.003" in (workspace.root / "configs" / "mine.yaml").read_text()
    loaded = workspace.call("/load_config", "configs/mine.yaml")
    assert _message(loaded).startswith("Loaded") and {"value": 0.003, "__type__": "update"} in loaded


def test_errors_never_quote_the_file(workspace):
    (workspace.root / "notes.txt").write_text("top-secret-token-42: the password\n")
    (workspace.root / "values.yaml").write_text("learning_rate: secret-value-9\n")
    (workspace.root / "binary.yaml").write_bytes(b"\xff\xfe secret-bytes")
    (workspace.root / "broken.yaml").write_text("a: [secret-unclosed\n")
    for name, fault in [("notes.txt", "line 1: a key that is not a config key"),
                        ("values.yaml", "line 1: the value of 'learning_rate' is not valid for it (expected float)"),
                        ("binary.yaml", "not a text file"), ("broken.yaml", "not valid YAML")]:
        message = _message(workspace.call("/load_config", name))
        assert fault in message and name in message, message
        assert "secret" not in message.replace(str(workspace.root), ""), message


def test_start_checks_every_path_before_writing(workspace):
    cases = {
        "output_dir": workspace.form(output_dir="link-out/run"),
        "dataset_dir": workspace.form(output_dir="runs/a", dataset_dir="link-out/data", dataset=["leak"]),
        "the file of dataset 'escape'": workspace.form(output_dir="runs/b", dataset_dir="data", dataset=["escape"]),
        "model_name_or_path": workspace.form(output_dir="runs/c", model_name_or_path=str(workspace.outside)),
    }
    for what, values in cases.items():
        message = _message(workspace.call("/start", *values, ""))
        assert what in message and f"outside the workspace root {workspace.root}" in message, message
    message = _message(workspace.call("/start", *workspace.form(output_dir="runs/d"), "deepspeed: /etc/ds.json\n"))
    assert "deepspeed /etc/ds.json is outside the workspace root" in message
    assert not (workspace.root / "runs").exists() and not (workspace.outside / "run").exists()
    held = workspace.root / "held"
    held.mkdir()
    (held / "train_results.json").write_text("{}")
    message = _message(workspace.call("/start", *workspace.form(output_dir="held"), ""))
    assert f"output_dir {held} already holds a run" in message
    assert sorted(p.name for p in held.iterdir()) == ["train_results.json"]  # nothing written into it


def test_datasets_watch_chat_and_export_stay_inside(workspace):
    note = workspace.call("/datasets", "link-out/data", [])[1]
    assert "dataset_dir link-out/data is outside the workspace root" in note
    choices, note, _ = workspace.call("/datasets", "data", [])
    assert "escape" not in json.dumps(choices) and "outside-row" not in note  # its file lies outside
    note = workspace.call("/preview", "data", ["escape"])[0]
    assert "the file of dataset 'escape'" in note and "outside the workspace root" in note
    assert "outside the workspace root" in str(workspace.call("/watch", str(workspace.outside)))
    info = workspace.call("/load_chat", str(workspace.outside), "", "auto")[0]
    assert "model_name_or_path" in info and "outside the workspace root" in info
    info = workspace.call("/load_chat", "", "link-out", "auto")[0]
    assert "run or adapter folder link-out is outside the workspace root" in info
    _, result = workspace.call("/export", "", "", "auto", str(workspace.outside / "exported"), 1, "bfloat16")
    assert "export_dir" in result and "outside the workspace root" in result
    assert not (workspace.outside / "exported").exists()


def test_the_page_needs_the_login(workspace):
    import urllib.error
    import urllib.request

    from gradio_client import Client

    with pytest.raises(Exception, match="(?i)login|auth|401|credentials"):  # noqa: B017 (gradio_client's own types)
        Client(workspace.url, verbose=False).predict("x.yaml", api_name="/load_config")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(workspace.url + "gradio_api/info", timeout=10)
    assert refused.value.code == 401


def test_requests_for_another_host_are_refused(workspace):
    import http.client

    port = int(workspace.url.rstrip("/").rsplit(":", 1)[1])
    for host, expected in [("evil.example", 421), (f"evil.example:{port}", 421), ("127.0.0.1:1", 421),
                           (f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200)]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/", headers={"Host": host})
        response = conn.getresponse()
        assert response.status == expected, (host, response.status)
        body = response.read()
        if expected == 421:
            assert b"DNS rebinding" in body
        conn.close()


def test_binding_off_loopback_needs_a_login(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TUNESMITH_WEBUI_AUTH"}
    for args, faults in [(["--host", "0.0.0.0"], ["refusing to serve the web UI on 0.0.0.0 without a login",
                                                  "pass --auth USER:PASSWORD (or set TUNESMITH_WEBUI_AUTH)"]),
                         (["--host", "0.0.0.0", "--auth", "nopassword"], ["--auth: expected USER:PASSWORD"]),
                         (["--root", str(tmp_path / "missing")], ["no such folder"])]:
        done = subprocess.run([sys.executable, "-m", "tunesmith", "webui", "--port", str(_free_port()), *args],
                              capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
        assert done.returncode != 0 and all(f in done.stderr for f in faults), (args, done.stderr)
