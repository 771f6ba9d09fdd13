"""The page: Train, Monitor, Chat and Export tabs, thin shells over the CLI's code paths.

Training and export run as `tunesmith train|export <yaml>` subprocesses, so the page and the
command line share one code path and one wording of errors; chat uses the same ChatEngine as
`tunesmith chat`. Run state is kept in the run's output_dir (runs.py), never only in the page.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunesmith.config import DEFAULT_MODEL, load_config
from tunesmith.data.readers import read_rows
from tunesmith.data.registry import REGISTRY_FILE, load_registry, resolve_datasets
from tunesmith.errors import UserError
from tunesmith.infer import ChatEngine
from tunesmith.loading import settings_for, source_from_folder
from tunesmith.run_folder import RUN_MARKERS, list_checkpoints
from tunesmith.template import template_names
from tunesmith.ui import form
from tunesmith.ui.evaluate_tab import build_evaluate_tab
from tunesmith.ui.runs import (
    CONFIG_FILE,
    RunManager,
    RunStatus,
    console_text,
    error_block,
    error_text,
    follow_command,
)
from tunesmith.ui.workspace import Workspace

# The Train form, by section; every other key goes in the "More keys" box as YAML.
TRAIN_SECTIONS: dict[str, tuple[str, ...]] = {
    "Hyper-parameters": ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                         "gradient_accumulation_steps", "lr_scheduler_type", "warmup_ratio", "weight_decay",
                         "max_grad_norm", "cutoff_len", "max_samples", "seed", "bf16", "packing"),
    "LoRA / freeze": ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "freeze_trainable_layers"),
    "Evaluation and logging": ("val_size", "eval_strategy", "eval_steps", "logging_steps", "save_steps",
                               "plot_loss", "report_to"),
}
TOP_KEYS = ("model_name_or_path", "template", "finetuning_type", "dataset_dir", "dataset")
OUTPUT_KEYS = ("output_dir", "overwrite_output_dir")
FORM_KEYS: list[str] = [*TOP_KEYS, *(k for keys in TRAIN_SECTIONS.values() for k in keys), *OUTPUT_KEYS]
GENERATION_KEYS = ("do_sample", "temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty")
EXPORT_KEYS = ("export_dir", "export_size", "export_dtype")
PREVIEW_ROWS = 5
MODEL_SUGGESTIONS = [DEFAULT_MODEL]  # the default model preselected; any local folder can be typed in

CSS = """
.gradio-container {max-width: 1400px !important}
.wrap-code pre, .wrap-code code {white-space: pre-wrap !important; overflow-wrap: anywhere}
"""


def loss_figure(status: RunStatus, width: float, height: float) -> Any:
    """Train and eval loss against steps, the x axis spanning the whole run so progress shows."""
    from matplotlib.figure import Figure  # no pyplot: nothing global to leak between requests

    fig = Figure(figsize=(width, height), dpi=100)
    ax = fig.add_subplot()
    if status.train_points:
        ax.plot(*zip(*status.train_points, strict=True), color="#1f5fa8", label="train loss")
    if status.eval_points:
        ax.plot(*zip(*status.eval_points, strict=True), "o-", color="#d9822b", label="eval loss")
    if status.train_points or status.eval_points:
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", color="gray", transform=ax.transAxes)
    if status.total_steps:
        ax.set_xlim(0, status.total_steps)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _cell(value: Any, limit: int = 160) -> str:
    import json

    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def dataset_choices(dataset_dir: str, workspace: Workspace) -> tuple[list[str], str]:
    """Names in dataset_dir/dataset_info.json whose files are present (inside the workspace), and a note
    about the rest."""

    folder = workspace.path(dataset_dir, "dataset_dir")
    registry = load_registry(folder)

    def present_here(entry: Any) -> bool:
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            return False
        file = (folder / entry["file_name"]).resolve()
        return file.is_relative_to(workspace.root) and file.exists()

    present = [name for name, entry in registry.items() if present_here(entry)]
    missing = len(registry) - len(present)
    note = f"{len(present)} dataset(s) in `{Path(dataset_dir) / REGISTRY_FILE}`"
    if missing:
        note += f" ({missing} more name hub datasets or files not present)"
    return present, note


def dataset_preview(dataset_dir: str, names: list[str], workspace: Workspace) -> tuple[Any, str]:
    """The first rows of the first chosen dataset, as a table."""
    import pandas as pd


    if not names:
        return pd.DataFrame(), ""
    workspace.check_datasets(dataset_dir, names[:1])
    spec = resolve_datasets(names[:1], dataset_dir)[0]
    rows = []
    for index, _, row in read_rows(spec):
        if index >= PREVIEW_ROWS:
            break
        rows.append(row)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    table = pd.DataFrame([[_cell(row.get(c, "")) for c in columns] for row in rows], columns=columns)
    files = ", ".join(p.name for p in spec.paths)
    return table, f"First {len(rows)} rows of `{spec.name}` ({files}, {spec.formatting})"


class WebUI:
    """Server-side state shared by every page: runs, the loaded chat model, a scratch folder."""

    def __init__(self, work_dir: Path | None = None, root: str | Path | None = None) -> None:
        import tempfile

        self.workspace = Workspace(root)
        self.runs = RunManager()
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="tunesmith-webui-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._engine: Any = None
        self._engine_key: tuple[str, str, str] | None = None
        self._engine_lock = threading.Lock()

    # -- train ------------------------------------------------------------------------------

    def form_yaml(self, values: list[Any], extra_text: str) -> tuple[dict[str, Any], str]:
        settings = form.settings_from_form(FORM_KEYS, values)
        text = form.config_yaml(settings, form.extra_settings(extra_text))
        scratch = self.scratch_file("form-")
        try:
            form.check_yaml(text, scratch, "the form")
        finally:
            scratch.unlink(missing_ok=True)
        return settings, text

    def start(self, values: list[Any], extra_text: str) -> tuple[dict[str, Any], str, Path]:
        """Check the whole config (keys, values, every path inside the workspace, the datasets) before
        anything is written, then launch the run; returns (form settings, YAML, output_dir)."""
        settings, text = self.form_yaml(values, extra_text)
        merged = {**settings, **form.extra_settings(extra_text)}
        self.workspace.check_settings(merged)
        if merged.get("output_dir") is None:
            raise UserError("output_dir: give the run folder, inside the workspace root "
                            f"{self.workspace.root}.")
        self.workspace.check_datasets(merged.get("dataset_dir") or form.default("dataset_dir"),
                                      merged.get("dataset"))
        out = self.workspace.path(merged["output_dir"], "output_dir")
        if _holds_run(out) and not merged.get("overwrite_output_dir") and not merged.get("resume_from_checkpoint"):
            raise UserError(f"output_dir {out} already holds a run.",  # refused before its files are touched
                            hint="continue it with resume_from_checkpoint: true, start afresh with "
                                 "overwrite_output_dir: true, or choose another output_dir.")
        return settings, text, self.runs.start(out, text)

    def scratch_file(self, prefix: str) -> Path:
        """A new file of our own in the work folder: pages may submit at the same time."""
        import tempfile

        handle, name = tempfile.mkstemp(prefix=prefix, suffix=".yaml", dir=self.work_dir)
        os.close(handle)
        return Path(name)

    # -- chat -------------------------------------------------------------------------------

    def chat_source(self, model: str, run_folder: str, template: str) -> tuple[Any, Any]:
        """(config, model source) for the chat and export tabs: the run or adapter folder picked, or
        the base model alone when none is. Both must lie inside the workspace."""
        self.workspace.model(model)
        folder = (run_folder or "").strip()
        if folder:
            folder = str(self.workspace.path(folder, "run or adapter folder"))
        cfg = load_config(None, {"model_name_or_path": (model or DEFAULT_MODEL).strip(),
                                 "template": None if template in ("", "auto", None) else template})
        return cfg, source_from_folder(cfg.model, folder or None)

    def load_engine(self, model: str, run_folder: str, template: str) -> Any:
        """One chat model for the server (the memory of one), replaced when another is asked for."""

        key = ((model or DEFAULT_MODEL).strip(), (run_folder or "").strip(), template or "auto")
        with self._engine_lock:
            if self._engine is None or self._engine_key != key:
                self._engine, self._engine_key = None, None
                cfg, source = self.chat_source(*key)
                self._engine = ChatEngine(cfg, source=source)
                self._engine_key = key
            return self._engine

    def engine_for(self, key: tuple[str, str, str] | None) -> Any:
        if key is None:
            return None
        return self.load_engine(*key)

    # -- export -----------------------------------------------------------------------------

    def export(self, model: str, run_folder: str, template: str, export_dir: str, export_size: Any,
               export_dtype: str) -> Iterator[tuple[str, str]]:
        """Run `tunesmith export` and yield (console so far, result) as it goes."""
        import yaml

        try:
            self.workspace.path(export_dir or "", "export_dir")
            cfg, source = self.chat_source(model, run_folder, template)
        except UserError as exc:
            yield "", error_block(exc)
            return
        settings = {**settings_for(source), "template": cfg.model.template,
                    "export_dir": (export_dir or "").strip() or None,
                    "export_size": export_size, "export_dtype": export_dtype}
        path = self.scratch_file("export-")
        path.write_text(yaml.safe_dump({k: v for k, v in settings.items() if v is not None}, sort_keys=False),
                        encoding="utf-8")
        for console, working, code in follow_command(["export", str(path)], "**Exporting…**"):
            if code is None:
                yield console, working
        if code != 0:
            yield console, error_block(error_text(console) or f"tunesmith export exited with code {code}")
            return
        out = Path(settings["export_dir"]).expanduser().resolve()
        files = sorted(p for p in out.iterdir() if p.is_file())
        listing = "\n".join(f"| `{p.name}` | {_size(p.stat().st_size)} |" for p in files)
        verified = "  \n".join(line for line in console.splitlines() if line.startswith("Verified:"))
        yield console, (f"**Exported and verified** to `{out}`  \n{verified}\n\n| file | size |\n|---|---|\n"
                        f"{listing}")


def _holds_run(folder: Path) -> bool:
    """True when folder holds what `tunesmith train` refuses to overwrite unasked."""

    return folder.is_dir() and (any((folder / m).exists() for m in RUN_MARKERS) or bool(list_checkpoints(folder)))


def build_app(ui: WebUI | None = None) -> Any:
    """The Gradio Blocks of the page."""
    import gradio as gr


    ui = ui or WebUI()
    templates = ["auto", *template_names()]

    with gr.Blocks(title="tunesmith", analytics_enabled=False) as app:
        watched = gr.State("")  # the output_dir this page follows
        seen = gr.State({})  # what the page already shows, so a tick sends only changes
        engine_key = gr.State(None)
        history = gr.State([])
        gr.Markdown("## tunesmith: fine-tune, watch, chat, export")
        with gr.Tabs():
            # ---------------------------------------------------------------- Train
            with gr.Tab("Train", id="train"), gr.Row():
                with gr.Column(scale=3):
                    widgets: dict[str, Any] = {}
                    with gr.Row():
                        widgets["model_name_or_path"] = form.widget(
                            "model_name_or_path", "train", scale=2,
                            suggestions=MODEL_SUGGESTIONS)
                        widgets["template"] = gr.Dropdown(templates, value="auto", label="template",
                                                          info=form.help_text("template"),
                                                          elem_id="train-template")
                        widgets["finetuning_type"] = form.widget("finetuning_type", "train")
                    with gr.Row():
                        widgets["dataset_dir"] = form.widget("dataset_dir", "train")
                        widgets["dataset"] = gr.Dropdown([], value=[], multiselect=True,
                                                         allow_custom_value=True, label="dataset",
                                                         info=form.help_text("dataset"),
                                                         elem_id="train-dataset")
                    preview_note = gr.Markdown(elem_id="train-preview-note", elem_classes="wrap-code")
                    preview = gr.Dataframe(interactive=False, max_height=220, visible=False,
                                           elem_id="train-preview", show_label=False)
                    for section, keys in TRAIN_SECTIONS.items():
                        with gr.Accordion(section, open=section == "Hyper-parameters"):
                            for start in range(0, len(keys), 4):
                                with gr.Row():
                                    for key in keys[start:start + 4]:
                                        widgets[key] = form.widget(key, "train")
                    with gr.Accordion("More keys", open=False):
                        extra = gr.Textbox(lines=4, label="more keys (YAML)", elem_id="train-extra",
                                           info="Any other config key, one `key: value` per line; "
                                                "`tunesmith train --keys` lists them all.")
                    with gr.Row():
                        widgets["output_dir"] = form.widget("output_dir", "train", scale=3)
                        widgets["overwrite_output_dir"] = form.widget("overwrite_output_dir", "train")
                    with gr.Row():
                        config_path = gr.Textbox("saves/webui_config.yaml", label="config file",
                                                 info="Where Save writes the YAML and Load reads it.",
                                                 elem_id="train-config-path", scale=3)
                        preview_btn = gr.Button("Preview YAML", elem_id="train-preview-yaml")
                        save_btn = gr.Button("Save config", elem_id="train-save")
                        load_btn = gr.Button("Load config", elem_id="train-load")
                    with gr.Row():
                        start_btn = gr.Button("Start", variant="primary", elem_id="train-start")
                        stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop")
                    message = gr.Markdown(elem_id="train-message", elem_classes="wrap-code")
                    yaml_view = gr.Code(language="yaml", label="config YAML", visible=False,
                                        elem_id="train-yaml")
                with gr.Column(scale=2):
                    train_status = gr.Markdown("No run started yet.", elem_id="train-status", elem_classes="wrap-code")
                    train_plot = gr.Plot(show_label=False, format="png", elem_id="train-plot")
            # ---------------------------------------------------------------- Monitor
            with gr.Tab("Monitor", id="monitor"):
                with gr.Row():
                    monitor_dir = gr.Textbox(label="output_dir", info="The run folder to follow.",
                                             elem_id="monitor-dir", scale=4)
                    watch_btn = gr.Button("Watch", elem_id="monitor-watch")
                    monitor_stop = gr.Button("Stop", variant="stop", elem_id="monitor-stop")
                monitor_status = gr.Markdown(elem_id="monitor-status", elem_classes="wrap-code")
                monitor_plot = gr.Plot(show_label=False, format="png", elem_id="monitor-plot")
                monitor_log = gr.Textbox(label="console", lines=14, max_lines=14, autoscroll=True,
                                         interactive=False, elem_id="monitor-log")
            # ---------------------------------------------------------------- Chat
            with gr.Tab("Chat", id="chat"):
                with gr.Row():
                    chat_model = form.widget("model_name_or_path", "chat", scale=2, suggestions=MODEL_SUGGESTIONS)
                    chat_run = gr.Textbox(label="run or adapter folder", elem_id="chat-run", scale=2,
                                          info="A run's output_dir (its adapter or model) or an adapter "
                                               "folder; empty = the base model alone.")
                    chat_template = gr.Dropdown(templates, value="auto", label="template", elem_id="chat-template",
                                                info=form.help_text("template"))
                    chat_load = gr.Button("Load", elem_id="chat-load")
                chat_info = gr.Markdown(elem_id="chat-info", elem_classes="wrap-code")
                system = gr.Textbox(label="system prompt", elem_id="chat-system",
                                    info="Leave empty to use the template's default.")
                with gr.Accordion("Generation", open=False), gr.Row():
                    gen_widgets = [form.widget(key, "chat") for key in GENERATION_KEYS]
                chatbot = gr.Chatbot(elem_id="chat-box", height=360, label="conversation")
                with gr.Row():
                    chat_input = gr.Textbox(show_label=False, placeholder="Type a message, Enter to send",
                                            elem_id="chat-input", scale=5)
                    send_btn = gr.Button("Send", variant="primary", elem_id="chat-send")
                    clear_btn = gr.Button("Clear", elem_id="chat-clear")
            # ---------------------------------------------------------------- Export
            with gr.Tab("Export", id="export"):
                with gr.Row():
                    export_model = form.widget("model_name_or_path", "export", scale=2,
                                               suggestions=MODEL_SUGGESTIONS)
                    export_run = gr.Textbox(label="run or adapter folder", elem_id="export-run", scale=2,
                                            info="The adapter or model to export; empty = the base model.")
                    export_template = gr.Dropdown(templates, value="auto", label="template",
                                                  elem_id="export-template", info=form.help_text("template"))
                with gr.Row():
                    export_widgets = [form.widget(key, "export", value="exports/model" if key == "export_dir"
                                                  else form.default(key)) for key in EXPORT_KEYS]
                export_btn = gr.Button("Export", variant="primary", elem_id="export-start")
                export_result = gr.Markdown(elem_id="export-result", elem_classes="wrap-code")
                export_log = gr.Textbox(label="console", lines=10, max_lines=10, autoscroll=True,
                                        interactive=False, elem_id="export-log")
            # ---------------------------------------------------------------- Evaluate
            build_evaluate_tab(ui, templates)
        timer = gr.Timer(1.0)

        form_inputs = [widgets[k] for k in FORM_KEYS]

        # ---- Train: dataset picker and preview
        def refresh_datasets(dataset_dir: str, chosen: list[str]) -> tuple[Any, ...]:
            try:
                names, note = dataset_choices(dataset_dir, ui.workspace)
            except UserError as exc:
                return gr.update(choices=[], value=[]), error_block(exc), gr.update(value=None, visible=False)
            kept = [n for n in (chosen or []) if n in names]
            table, preview_text = _safe_preview(dataset_dir, kept, ui.workspace)
            return gr.update(choices=names, value=kept), note + ("  \n" + preview_text if preview_text else ""), table

        def show_preview(dataset_dir: str, chosen: list[str]) -> tuple[Any, str]:
            table, text = _safe_preview(dataset_dir, chosen or [], ui.workspace)
            return text, table

        widgets["dataset_dir"].submit(refresh_datasets, [widgets["dataset_dir"], widgets["dataset"]],
                                      [widgets["dataset"], preview_note, preview], api_name="datasets")
        widgets["dataset_dir"].blur(refresh_datasets, [widgets["dataset_dir"], widgets["dataset"]],
                                    [widgets["dataset"], preview_note, preview])
        widgets["dataset"].input(show_preview, [widgets["dataset_dir"], widgets["dataset"]], [preview_note, preview],
                                 api_name="preview")

        # ---- Train: YAML, save, load, start, stop
        def preview_yaml(*values: Any) -> tuple[Any, str]:
            try:
                _, text = ui.form_yaml(list(values[:-1]), values[-1])
            except UserError as exc:
                return gr.update(visible=False), error_block(exc)
            return gr.update(value=text, visible=True), "The YAML below is what Start runs."

        def save_config(path: str, *values: Any) -> tuple[Any, str]:
            try:
                _, text = ui.form_yaml(list(values[:-1]), values[-1])
                target = ui.workspace.path(path, "config file")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
            except UserError as exc:
                return gr.update(), error_block(exc)
            except OSError as exc:
                return gr.update(), error_block(f"error: cannot write {path}: {exc.strerror}")
            return gr.update(value=text, visible=True), f"Saved to `{target}`."

        def load_config_file(path: str) -> list[Any]:
            try:
                return _form_updates(gr, ui, path.strip(), "Loaded")
            except UserError as exc:
                return [gr.update() for _ in FORM_KEYS] + [gr.update(), error_block(exc), gr.update(), gr.update()]

        def start_run(*values: Any) -> list[Any]:
            unchanged = [gr.update()] * 9
            try:
                settings, text, out = ui.start(list(values[:-1]), values[-1])
            except UserError as exc:
                return [gr.update(visible=False), error_block(exc), *unchanged]
            model = settings["model_name_or_path"] or DEFAULT_MODEL
            template = settings["template"] or "auto"
            return [gr.update(value=text, visible=True),
                    f"Started `tunesmith train {out / CONFIG_FILE}`; its console is in the Monitor tab.",
                    str(out), {}, str(out), model, str(out), template, model, str(out), template]

        def stop_run(path: str) -> str:
            if not path:
                return "No run to stop."
            status = ui.runs.stop(path)
            if status.state == "stopping":
                return "Asked the run to stop: sent SIGINT, as Ctrl-C in a terminal does."
            return f"Nothing to stop: the run in `{status.output_dir}` is {status.state}."

        yaml_inputs = [*form_inputs, extra]
        preview_btn.click(preview_yaml, yaml_inputs, [yaml_view, message])
        save_btn.click(save_config, [config_path, *yaml_inputs], [yaml_view, message], api_name="save_config")
        load_btn.click(load_config_file, [config_path], [*form_inputs, extra, message, preview_note, preview],
                       api_name="load_config")
        start_btn.click(start_run, yaml_inputs, api_name="start", outputs=
                        [yaml_view, message, watched, seen, monitor_dir, chat_model, chat_run, chat_template,
                         export_model, export_run, export_template])
        stop_btn.click(stop_run, [watched], [message])
        monitor_stop.click(stop_run, [watched], [monitor_status])

        # ---- Monitor: follow a run
        def watch(path: str) -> tuple[str, dict, Any]:
            if not path or not path.strip():
                return "", {}, gr.update()
            try:
                return str(ui.workspace.path(path, "output_dir")), {}, gr.update()
            except UserError as exc:
                return "", {}, error_block(exc)

        watch_btn.click(watch, [monitor_dir], [watched, seen, monitor_status], api_name="watch")
        monitor_dir.submit(watch, [monitor_dir], [watched, seen, monitor_status])

        def tick(path: str, shown: dict) -> list[Any]:
            if not path:
                return [gr.skip()] * 6
            status = ui.runs.status(path)
            summary = status.summary()
            if status.error:
                summary += "\n\n" + error_block(status.error)
            points = (len(status.train_points), len(status.eval_points), status.total_steps)
            console = console_text(Path(path))
            updates = [
                summary if shown.get("summary") != summary else gr.skip(),
                summary if shown.get("summary") != summary else gr.skip(),
                loss_figure(status, 5.6, 3.4) if shown.get("points") != points else gr.skip(),
                loss_figure(status, 11, 3.8) if shown.get("points") != points else gr.skip(),
                console if shown.get("console") != console else gr.skip(),
            ]
            shown = {"summary": summary, "points": points, "console": console}
            return [*updates, shown]

        timer.tick(tick, [watched, seen], [train_status, monitor_status, train_plot, monitor_plot, monitor_log, seen],
                   show_progress="hidden", concurrency_limit=None)

        # ---- A reloaded page follows the run last started here, with its form restored.
        def on_load() -> list[Any]:
            latest = ui.runs.latest
            if latest is not None and (latest / CONFIG_FILE).is_file():
                try:
                    updates = _form_updates(gr, ui, str(latest / CONFIG_FILE), "Following the run started from")
                except UserError:
                    updates = [gr.update() for _ in FORM_KEYS] + [gr.update(), "", gr.update(), gr.update()]
                return [*updates, str(latest), str(latest), {}]
            dataset_update, note, table = refresh_datasets(form.default("dataset_dir"), [])
            if note.startswith("```"):  # no data folder here yet: say nothing until one is chosen
                note = ""
            updates = [gr.update() for _ in FORM_KEYS]
            updates[FORM_KEYS.index("dataset")] = dataset_update
            return [*updates, gr.update(), "", note, table, "", "", {}]

        app.load(on_load, None, [*form_inputs, extra, message, preview_note, preview, watched, monitor_dir, seen])

        # ---- Chat
        def load_chat(model: str, run_folder: str, template: str) -> tuple[str, Any, list, list]:
            try:
                engine = ui.load_engine(model, run_folder, template)
            except UserError as exc:
                return error_block(exc), None, [], []
            key = ((model or DEFAULT_MODEL).strip(), (run_folder or "").strip(), template or "auto")
            return f"Loaded {engine.description}.", key, [], []

        def send(text: str, past: list, system_prompt: str, key: Any, *gen: Any) -> Iterator[tuple[Any, ...]]:
            text = (text or "").strip()
            if not text:
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
                return
            if key is None:
                yield gr.skip(), gr.skip(), gr.skip(), "Load a model first."
                return
            engine = ui.engine_for(tuple(key))
            turns = [*past, {"role": "user", "content": text}]
            prompt = ([{"role": "system", "content": system_prompt.strip()}] if system_prompt and system_prompt.strip()
                      else []) + turns
            settings = form.settings_from_form(list(GENERATION_KEYS), list(gen))
            reply = ""
            try:
                for piece in engine.stream_chat(prompt, **settings):
                    reply += piece
                    yield [*turns, {"role": "assistant", "content": reply}], "", gr.skip(), gr.skip()
            except UserError as exc:
                yield turns, "", past, error_block(exc)
                return
            done = [*turns, {"role": "assistant", "content": reply}]
            yield done, "", done, gr.skip()

        chat_load.click(load_chat, [chat_model, chat_run, chat_template], [chat_info, engine_key, chatbot, history],
                        api_name="load_chat")
        chat_inputs = [chat_input, history, system, engine_key, *gen_widgets]
        chat_outputs = [chatbot, chat_input, history, chat_info]
        send_btn.click(send, chat_inputs, chat_outputs)
        chat_input.submit(send, chat_inputs, chat_outputs)
        clear_btn.click(lambda: ([], [], ""), None, [chatbot, history, chat_input])

        # ---- Export
        export_btn.click(ui.export, [export_model, export_run, export_template, *export_widgets],
                         [export_log, export_result], api_name="export")
    return app


def _safe_preview(dataset_dir: str, names: list[str], workspace: Workspace) -> tuple[Any, str]:
    """(update of the preview table, note above it); a data problem goes in the note, worded as the CLI words it."""
    import gradio as gr

    try:
        table, text = dataset_preview(dataset_dir, names, workspace)
    except UserError as exc:
        return gr.update(value=None, visible=False), error_block(exc)
    return gr.update(value=table, visible=not table.empty), text


def _form_updates(gr: Any, ui: WebUI, path: str, verb: str) -> list[Any]:
    """Updates that put a YAML config into the Train form: form fields, more keys, message, dataset preview."""
    import yaml

    values, others = ui.workspace.read_config(path, FORM_KEYS)
    datasets = list(values["dataset"] or [])
    try:
        names, _ = dataset_choices(values["dataset_dir"], ui.workspace)
    except UserError:
        names = []
    updates = [gr.update(value=values[k]) for k in FORM_KEYS]
    updates[FORM_KEYS.index("dataset")] = gr.update(choices=sorted(set(names) | set(datasets)), value=datasets)
    extra_text = yaml.safe_dump(others, sort_keys=False) if others else ""
    table, note = _safe_preview(values["dataset_dir"], datasets, ui.workspace)
    return [*updates, gr.update(value=extra_text), f"{verb} `{path}`.", note, table]


def cleanup(ui: WebUI) -> None:
    shutil.rmtree(ui.work_dir, ignore_errors=True)
