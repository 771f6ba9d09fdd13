"""Evaluation by generation: answer every eval sample, then score the answers against the labels.

The model is loaded as `tunesmith chat` loads it (ChatEngine: an explicit adapter, the run in
output_dir, or the base), prompts are rendered by the training template, and answers are
generated in left-padded batches, greedy unless asked to sample. Scores are corpus BLEU-4
(sacrebleu) and mean ROUGE-1/2/L F1 (rouge-score), both x100 and on one tokenization: Chinese,
Japanese and Korean characters count one token each, other text is split into words
(sacrebleu's "zh" tokenizer). Written to the output folder: generated_predictions.jsonl (one
line per sample) and predict_results.json, with the key names LLaMA-Factory uses.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config import RunConfig
from tunesmith.data.formats import load_conversations
from tunesmith.errors import UserError
from tunesmith.infer import ChatEngine, check_backend
from tunesmith.loading import ModelSource, source_for

PREDICTIONS_FILE = "generated_predictions.jsonl"
RESULTS_FILE = "predict_results.json"
METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


@dataclass
class EvalCase:
    """One eval sample: the conversation up to its last answer, and that answer as the label."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    label: str
    source: tuple[str, int]


def eval_cases(cfg: RunConfig) -> list[EvalCase]:
    """The samples of eval_dataset (else of dataset), each cut before its last assistant answer."""

    d = cfg.data
    names = d.eval_dataset or d.dataset
    if not names:
        raise UserError(f"{cfg.source or 'config'}: neither 'eval_dataset' nor 'dataset' is set; name the "
                        f"dataset(s) to evaluate on from {Path(d.dataset_dir) / 'dataset_info.json'}.")
    cases = []
    for conv in load_conversations(names, d.dataset_dir, max_samples=d.max_samples, skip_invalid=d.skip_invalid,
                                   seed=cfg.train.seed):
        last = max((i for i, m in enumerate(conv.messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            continue
        answer = conv.messages[last]
        label = answer.get("content") or json.dumps(answer.get("tool_calls") or [], ensure_ascii=False)
        cases.append(EvalCase(conv.messages[:last], conv.tools, label, conv.source))
    if not cases:
        raise UserError(f"dataset(s) '{names}' hold no sample with an assistant answer to compare against.")
    return cases


# ------------------------------------------------------------------------------------ generation

def _prompt(engine: Any, case: EvalCase) -> tuple[str, list[int]]:
    """(text, ids) of a case's prompt, encoded as chat encodes it (default_system included)."""
    encoded = engine.encode_prompt(case.messages, case.tools, case.source)
    return encoded.text, encoded.ids


def _answer(engine: Any, new_ids: list[int]) -> str:
    """The generated text up to the end of turn: cut at the first eos id, then at any stop string."""
    end = next((i for i, t in enumerate(new_ids) if t in engine.eos_ids), len(new_ids))
    text = engine.tokenizer.decode(new_ids[:end], skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in engine.stop_texts if s) if i >= 0), default=len(text))
    return text[:cut].strip()


def generate_answers(engine: Any, prompts: list[list[int]], batch_size: int, gen_kwargs: dict[str, Any]
                     ) -> list[str]:
    """Answers to token-id prompts, in order. Batches hold prompts of similar length (less padding),
    padded on the left so that every row's answer starts at the same position."""
    import torch
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    pad = engine._pad_id()
    stops = engine.multi_token_stops
    with tqdm(total=len(prompts), desc="generate", unit="sample", file=sys.stderr, dynamic_ncols=True) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in rows])
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in rows])
            with torch.no_grad():
                out = engine.model.generate(
                    input_ids=ids.to(engine.model.device), attention_mask=mask.to(engine.model.device),
                    eos_token_id=engine.eos_ids, pad_token_id=pad, stop_strings=stops or None,
                    tokenizer=engine.tokenizer if stops else None, **gen_kwargs)
            for row, i in enumerate(rows):
                answers[i] = _answer(engine, out[row, width:].tolist())
            bar.update(len(rows))
    return answers


def predict(engine: Any, cases: list[EvalCase], cfg: RunConfig, *, greedy: bool = True) -> list[dict[str, Any]]:
    """One row per case: the rendered prompt, the label, the model's answer and the source row.
    Prompts longer than cutoff_len keep their last cutoff_len tokens (the question and the
    generation prompt are at the end)."""
    encoded = [_prompt(engine, c) for c in cases]
    texts, prompts = [text for text, _ in encoded], [ids for _, ids in encoded]
    cut = sum(len(p) > cfg.data.cutoff_len for p in prompts)
    if cut:
        print(f"warning: {cut} prompt(s) longer than cutoff_len ({cfg.data.cutoff_len}) keep only their last "
              f"{cfg.data.cutoff_len} tokens.", file=sys.stderr)
    prompts = [p[-cfg.data.cutoff_len :] for p in prompts]
    gen_kwargs = engine.generation_kwargs(do_sample=False) if greedy else engine.generation_kwargs()
    answers = generate_answers(engine, prompts, cfg.train.per_device_eval_batch_size, gen_kwargs)
    return [{"prompt": text, "predict": answer, "label": case.label, "dataset": case.source[0],
             "row": case.source[1]} for text, answer, case in zip(texts, answers, cases, strict=True)]


# ------------------------------------------------------------------------------------ scoring

class _CharsAndWords:
    """rouge-score's tokenizer interface on sacrebleu's "zh" tokenization (the one BLEU uses)."""

    def __init__(self) -> None:
        from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

        self.split = TokenizerZh()

    def tokenize(self, text: str) -> list[str]:
        return self.split(text).split()


def require_scorers() -> None:
    import importlib.util

    missing = [name for name, module in (("sacrebleu", "sacrebleu"), ("rouge-score", "rouge_score"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"scoring generated answers needs {' and '.join(missing)}, which is not installed.",
                        hint="pip install 'tunesmith[eval]'")


def score(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """Corpus BLEU-4 and mean ROUGE-1/2/L F1 of the predictions against the labels, x100."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not predictions or len(predictions) != len(labels):
        raise UserError(f"cannot score {len(predictions)} predictions against {len(labels)} labels.")
    bleu = sacrebleu.corpus_bleu(predictions, [labels], tokenize="zh")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_CharsAndWords())
    rouge = [scorer.score(label, pred) for pred, label in zip(predictions, labels, strict=True)]

    def mean(key: str) -> float:
        return 100 * sum(r[key].fmeasure for r in rouge) / len(rouge)

    return {"bleu-4": bleu.score, "rouge-1": mean("rouge1"), "rouge-2": mean("rouge2"), "rouge-l": mean("rougeL")}


# ------------------------------------------------------------------------------------ the command

def _write(folder: Path, rows: list[dict[str, Any]], results: dict[str, Any], suffix: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / PREDICTIONS_FILE.replace(".jsonl", f"{suffix}.jsonl"), "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    (folder / RESULTS_FILE.replace(".json", f"{suffix}.json")).write_text(json.dumps(results, indent=2) + "\n",
                                                                         encoding="utf-8")


def _evaluate_source(cfg: RunConfig, cases: list[EvalCase], source: Any, greedy: bool
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:

    engine = ChatEngine(cfg, source=source)
    print(f"Evaluating {engine.description} on {len(cases)} samples", file=sys.stderr)
    started = time.perf_counter()
    rows = predict(engine, cases, cfg, greedy=greedy)
    seconds = time.perf_counter() - started
    metrics = score([r["predict"] for r in rows], [r["label"] for r in rows])
    results = {**{f"predict_{k}": round(v, 4) for k, v in metrics.items()},
               "predict_samples": len(rows), "predict_runtime": round(seconds, 2),
               "predict_samples_per_second": round(len(rows) / max(seconds, 1e-9), 3),
               "predict_model": engine.description, "predict_decoding": "greedy" if greedy else "sampling"}
    return rows, results


def base_source(cfg: RunConfig, trained: Any) -> Any:
    """The config's base model alone (model_name_or_path, no adapter), read with the trained run's
    tokenizer so that it is prompted with the same template."""
    return ModelSource(dataclasses.replace(cfg.model, adapter_name_or_path=None), (), trained.tokenizer_dir,
                       f"the base model {cfg.model.model_name_or_path}")


def run_eval(cfg: RunConfig, *, out_dir: str | Path | None = None, compare_base: bool = False,
             greedy: bool = True) -> dict[str, Any]:
    """Generate, score and write the files; returns {"model": results} (and "base" with compare_base)."""

    check_backend(cfg)
    require_scorers()  # before minutes of generation, not after
    folder = Path(out_dir if out_dir is not None else cfg.train.output_dir).expanduser()
    trained = source_for(cfg)
    if compare_base and not trained.adapters and trained.model_args.model_name_or_path == \
            cfg.model.model_name_or_path:
        raise UserError(f"--compare-base: {trained.description}, so there is no trained model to compare with.",
                        hint="train first, or name the trained adapter with adapter_name_or_path.")
    cases = eval_cases(cfg)
    rows, results = _evaluate_source(cfg, cases, trained, greedy)
    _write(folder, rows, results)
    report = {"model": results}
    if compare_base:
        base_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, adapter_name_or_path=None))
        base_rows, report["base"] = _evaluate_source(base_cfg, cases, base_source(cfg, trained), greedy)
        _write(folder, base_rows, report["base"], suffix="_base")
    print(f"Wrote {folder / PREDICTIONS_FILE} and {folder / RESULTS_FILE}", file=sys.stderr)
    print(format_table(report))
    return report


def format_table(report: dict[str, dict[str, Any]]) -> str:
    """Metrics as a small table, one column per model evaluated."""
    columns = [name for name in ("model", "base") if name in report]
    header = f"{'metric':<12}" + "".join(f"{('trained' if c == 'model' else c):>12}" for c in columns)
    lines = [header]
    for key, label in (*((m, m) for m in METRICS), ("samples_per_second", "samples/s")):
        lines.append(f"{label:<12}" + "".join(f"{report[c]['predict_' + key]:>12.2f}" for c in columns))
    return "\n".join(lines)
