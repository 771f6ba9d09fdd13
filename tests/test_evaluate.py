"""`tunesmith eval` and LLaMA-Factory predict YAMLs: generated answers scored with sacrebleu and rouge-score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import make_dataset

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.errors import UserError

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

ROWS = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]] + \
       [{"instruction": "北京是哪个国家的首都？", "input": "", "output": "北京是中国的首都。"},
        {"instruction": "用一句话介绍你自己。", "input": "", "output": "我是一个乐于助人的助手。"}]


def direct_scores(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """The metrics straight from the two libraries, on CJK characters and words."""
    import sacrebleu
    from rouge_score import rouge_scorer
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    split = TokenizerZh()

    class Words:
        def tokenize(self, text: str) -> list[str]:
            return split(text).split()

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=Words())
    rouge = [scorer.score(label, pred) for pred, label in zip(predictions, labels, strict=True)]
    out = {"bleu-4": sacrebleu.corpus_bleu(predictions, [labels], tokenize="zh").score}
    for key, name in (("rouge1", "rouge-1"), ("rouge2", "rouge-2"), ("rougeL", "rouge-l")):
        out[name] = 100 * sum(r[key].fmeasure for r in rouge) / len(rouge)
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(run config YAML, dataset_dir) of a tiny LoRA run trained for a few steps."""
    from tunesmith.train import run_training

    root = tmp_path_factory.mktemp("eval-run")
    data = make_dataset(root / "data", {"mixed": {"file_name": "mixed.json"}}, {"mixed.json": ROWS})
    cfg = {"model_name_or_path": str(tiny_model_dir), "dataset": "mixed", "dataset_dir": str(data),
           "cutoff_len": 64, "output_dir": str(root / "run"), "per_device_train_batch_size": 2,
           "learning_rate": 5e-3, "max_steps": 3, "logging_steps": 1, "save_steps": 0,
           "preprocessing_num_workers": 1, "report_to": "none", "max_new_tokens": 12,
           "per_device_eval_batch_size": 4}
    run_training(load_config(None, cfg))
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path, data


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_eval_writes_predictions_and_scores_against_the_libraries(trained_run, tmp_path, capsys):
    cfg_path, _ = trained_run
    out = tmp_path / "eval"
    assert main(["eval", str(cfg_path), "--out", str(out), "--compare-base"]) == 0
    rows = read_rows(out / "generated_predictions.jsonl")
    assert [r["label"] for r in rows] == [r["output"] for r in ROWS]
    assert [(r["dataset"], r["row"]) for r in rows] == [("mixed", i) for i in range(len(ROWS))]
    for row, source in zip(rows, ROWS, strict=True):
        assert source["instruction"] in row["prompt"] and row["prompt"].endswith("<|im_start|>assistant\n")
        assert source["output"] not in row["prompt"]
    results = json.loads((out / "predict_results.json").read_text())
    assert {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_samples",
            "predict_runtime"} <= set(results)
    assert results["predict_samples"] == len(ROWS) and "trained adapter" in results["predict_model"]
    expected = direct_scores([r["predict"] for r in rows], [r["label"] for r in rows])
    for key, value in expected.items():
        assert results[f"predict_{key}"] == pytest.approx(value, abs=1e-4)
    base = json.loads((out / "predict_results_base.json").read_text())
    assert base["predict_model"].startswith("the base model")
    base_rows = read_rows(out / "generated_predictions_base.jsonl")
    assert base["predict_rouge-l"] == pytest.approx(
        direct_scores([r["predict"] for r in base_rows], [r["label"] for r in base_rows])["rouge-l"], abs=1e-4)
    table = capsys.readouterr().out
    assert "trained" in table and "base" in table and f"{results['predict_bleu-4']:.2f}" in table


def test_chinese_is_scored_by_characters_and_english_by_words():
    import sacrebleu

    from tunesmith.evaluate import score

    zh = score(["我爱北京"], ["我爱上海"])
    assert zh["rouge-1"] == pytest.approx(50.0)  # 2 of 4 characters shared
    assert zh["rouge-2"] == pytest.approx(100 / 3)  # 我爱 of 3 character pairs
    spaced = sacrebleu.corpus_bleu(["我 爱 北 京"], [["我 爱 上 海"]], tokenize="none").score
    assert zh["bleu-4"] == pytest.approx(spaced)
    en = score(["the cat sat"], ["the cat sat down"])
    assert en["rouge-1"] == pytest.approx(100 * 2 * 1.0 * 0.75 / 1.75)  # precision 1, recall 3/4
    assert score(["北京是中国的首都。", "1 plus 2 is 3."], ["北京是中国的首都。", "1 plus 2 is 3."]) == \
        pytest.approx({"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0})


@pytest.mark.slow
def test_llamafactory_predict_yaml_runs_through_train(trained_run, tmp_path):
    cfg_path, data = trained_run
    run = yaml.safe_load(cfg_path.read_text())
    predict_yaml = tmp_path / "predict.yaml"
    predict_yaml.write_text(f"""\
### model
model_name_or_path: {run['model_name_or_path']}
adapter_name_or_path: {run['output_dir']}

### method
stage: sft
do_predict: true
finetuning_type: lora

### dataset
eval_dataset: mixed
dataset_dir: {data}
cutoff_len: 64
max_samples: 3
overwrite_cache: true
preprocessing_num_workers: 1

### output
output_dir: {tmp_path / 'predict'}
overwrite_output_dir: true
report_to: none

### eval
per_device_eval_batch_size: 2
predict_with_generate: true
max_new_tokens: 8
ddp_timeout: 180000000
""", encoding="utf-8")
    # Like LLaMA-Factory's, the YAML sets no do_train and no dataset: nothing is trained.
    assert main(["train", str(predict_yaml)]) == 0
    rows = read_rows(tmp_path / "predict" / "generated_predictions.jsonl")
    assert [r["label"] for r in rows] == [r["output"] for r in ROWS[:3]]
    results = json.loads((tmp_path / "predict" / "predict_results.json").read_text())
    assert results["predict_samples"] == 3 and f"adapter {run['output_dir']}" in results["predict_model"]
    assert not (tmp_path / "predict" / "adapter_config.json").exists()  # nothing was trained


def test_do_predict_needs_predict_with_generate():
    with pytest.raises(UserError, match="set 'predict_with_generate: true'"):
        load_config(None, {"do_predict": True})


def test_compare_base_without_a_trained_model_is_refused(tiny_model_dir, tmp_path):
    from tunesmith.evaluate import run_eval

    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir), "dataset": "x"})  # names the base alone
    with pytest.raises(UserError, match="no trained model to compare with"):
        run_eval(cfg, out_dir=tmp_path / "eval", compare_base=True)


@pytest.mark.slow
def test_webui_evaluate_tab_runs_the_command_and_shows_its_metrics(trained_run, tmp_path):
    pytest.importorskip("gradio")
    from tunesmith.ui.app import WebUI, build_app
    from tunesmith.ui.evaluate_tab import run_eval

    cfg_path, data = trained_run
    run = yaml.safe_load(cfg_path.read_text())
    ui = WebUI(tmp_path / "work")
    build_app(ui)  # the page builds with the tab in it
    settings = {"model_name_or_path": run["model_name_or_path"], "output_dir": run["output_dir"],
                "dataset_dir": str(data), "eval_dataset": "mixed", "max_samples": "2", "max_new_tokens": 6.0,
                "per_device_eval_batch_size": 2}
    *_, (console, shown) = run_eval(ui.work_dir, settings, compare_base=True)
    folder = next((tmp_path / "work").glob("eval-*"))
    trained = json.loads((folder / "predict_results.json").read_text())
    base = json.loads((folder / "predict_results_base.json").read_text())
    assert trained["predict_samples"] == base["predict_samples"] == 2
    row = next(line for line in shown.splitlines() if line.startswith("| rouge-l |"))
    assert row == f"| rouge-l | {trained['predict_rouge-l']:.2f} | {base['predict_rouge-l']:.2f} |"
    assert "trained adapter" in shown and "base model" in shown, console

    broken = dict(settings, eval_dataset="missing")
    *_, (console, shown) = run_eval(ui.work_dir, broken, compare_base=False)
    assert "missing" in shown and shown.startswith("```text\nerror:"), console
