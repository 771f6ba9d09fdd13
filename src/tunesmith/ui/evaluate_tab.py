"""The Evaluate tab: `tunesmith eval` as a subprocess, its metrics shown as a table.

Like Train and Export, the page runs the command users run, so errors read the same. Result
files go to a fresh folder inside the server's work folder, never to a path typed in the page.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunesmith.config import DEFAULT_MODEL
from tunesmith.errors import UserError
from tunesmith.loading import settings_for
from tunesmith.ui import form
from tunesmith.ui.runs import error_block, error_text, follow_command

METRIC_KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "samples", "samples_per_second")


def metrics_table(results: dict[str, dict[str, Any]]) -> str:
    """predict_results.json of the model (and of the base) as one Markdown table."""
    columns = [name for name in ("trained", "base") if name in results]
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key in METRIC_KEYS:
        cells = [results[c].get(f"predict_{key}") for c in columns]
        lines.append(f"| {key} | " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in cells) + " |")
    described = "  \n".join(f"{c}: {results[c].get('predict_model', '')}" for c in columns)
    return "\n".join(lines) + f"\n\n{described}"


def run_eval(work_dir: Path, settings: dict[str, Any], compare_base: bool) -> Iterator[tuple[str, str]]:
    """Run `tunesmith eval` on the settings; yield (console so far, result as Markdown)."""
    import yaml

    folder = Path(tempfile.mkdtemp(prefix="eval-", dir=work_dir))
    config = folder / "eval.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in settings.items() if v not in (None, "")}, sort_keys=False),
                      encoding="utf-8")
    args = ["eval", str(config), "--out", str(folder)] + (["--compare-base"] if compare_base else [])
    for console, working, code in follow_command(args, "**Evaluating…**"):
        if code is None:
            yield console, working
    if code != 0:
        text = error_text(console) or f"tunesmith eval exited with code {code}"
        yield console, error_block(text)
        return
    results = {"trained": json.loads((folder / "predict_results.json").read_text(encoding="utf-8"))}
    if compare_base:
        results["base"] = json.loads((folder / "predict_results_base.json").read_text(encoding="utf-8"))
    yield console, metrics_table(results) + f"\n\nPredictions: `{folder / 'generated_predictions.jsonl'}`"


def build_evaluate_tab(ui: Any, templates: list[str]) -> None:
    """The tab's widgets and events; call inside the page's gr.Tabs(). `ui` is the page's WebUI: its
    workspace bounds every folder the tab reads, and it names the model to score as chat does."""
    import gradio as gr

    with gr.Tab("Evaluate", id="evaluate"):
        with gr.Row():
            model = form.widget("model_name_or_path", "eval", scale=2, suggestions=[DEFAULT_MODEL])
            run = gr.Textbox(label="run or adapter folder", elem_id="eval-run", scale=2,
                             info="The trained result to score (a run's output_dir); empty = the base model.")
            template = gr.Dropdown(templates, value="auto", label="template", elem_id="eval-template",
                                   info=form.help_text("template"))
        with gr.Row():
            dataset_dir = form.widget("dataset_dir", "eval")
            dataset = gr.Textbox(label="eval dataset", elem_id="eval-dataset",
                                 info="Dataset name(s) from dataset_info.json, comma separated.")
            max_samples = form.widget("max_samples", "eval", value=50)
            max_new_tokens = form.widget("max_new_tokens", "eval", value=128)
            batch = form.widget("per_device_eval_batch_size", "eval", value=8)
        compare = gr.Checkbox(label="also score the base model", value=True, elem_id="eval-compare")
        start = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
        result = gr.Markdown(elem_id="eval-result", elem_classes="wrap-code")
        log = gr.Textbox(label="console", lines=10, max_lines=10, autoscroll=True, interactive=False,
                         elem_id="eval-log")

        def evaluate(model: str, run: str, template: str, dataset_dir: str, dataset: str, max_samples: Any,
                     max_new_tokens: Any, batch: Any, compare: bool) -> Iterator[tuple[str, str]]:
            try:
                cfg, source = ui.chat_source(model, run, template)
                data = ui.workspace.path(dataset_dir or "data", "dataset_dir")
            except UserError as exc:
                yield "", error_block(str(exc))
                return
            settings = {**settings_for(source), "template": cfg.model.template, "dataset_dir": str(data),
                        "eval_dataset": (dataset or "").strip() or None, "max_samples": max_samples,
                        "max_new_tokens": max_new_tokens, "per_device_eval_batch_size": batch}
            yield from run_eval(ui.work_dir, settings, compare and bool(source.adapters))

        start.click(evaluate, [model, run, template, dataset_dir, dataset, max_samples, max_new_tokens, batch,
                               compare], [log, result])
