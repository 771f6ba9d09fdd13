"""Experiment trackers named in `report_to`: MLflow and Weights & Biases.

Each tracker has three calls: `start` (the resolved config as parameters), `log` (one entry of
trainer_log.jsonl as metrics at its step) and `finish` (final results, the loss plot and
train_results.json as artifacts, the run's status). RunLog drives them, so only the main
process (rank 0) ever reports. Where a run goes follows each library's own environment
variables, as in other trainers: MLFLOW_TRACKING_URI (a folder, `sqlite:///file.db` or a
server), MLFLOW_EXPERIMENT_NAME, MLFLOW_RUN_ID; WANDB_PROJECT, WANDB_MODE=offline, WANDB_DIR.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Protocol

from tunesmith.errors import UserError

TRACKERS = ("mlflow", "wandb")
INSTALL_HINT = "pip install 'tunesmith[trackers]'"
# Entry keys that are not figures of the step (the step itself, or totals that restate the plan).
_NOT_METRICS = {"step", "total_steps", "eta", "elapsed"}


class Tracker(Protocol):
    def start(self, params: dict[str, Any], run_name: str, output_dir: Path) -> None: ...

    def log(self, entry: dict[str, Any]) -> None: ...

    def finish(self, results: dict[str, Any] | None, output_dir: Path, status: str) -> None: ...


def requested(report_to: list[str]) -> list[str]:
    """The trackers of a `report_to` value, in the order given."""
    return [r for r in report_to if r in TRACKERS]


def metrics_of(entry: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a log entry: what a tracker can chart."""
    return {k: float(v) for k, v in entry.items() if k not in _NOT_METRICS and isinstance(v, int | float)
            and not isinstance(v, bool) and math.isfinite(v)}


def _param_value(value: Any) -> str:
    # MLflow keeps parameter values as strings of at most 6000 characters.
    text = "" if value is None else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


class MlflowTracker:
    def __init__(self) -> None:
        import mlflow

        self.mlflow = mlflow

    def start(self, params: dict[str, Any], run_name: str, output_dir: Path) -> None:
        mlflow = self.mlflow
        # MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME and MLFLOW_RUN_ID are read by mlflow itself;
        # the run it starts is mlflow's active run, which the calls below address.
        try:
            mlflow.start_run(run_name=None if os.environ.get("MLFLOW_RUN_ID") else run_name)
        except mlflow.exceptions.MlflowException as exc:
            raise UserError(f"report_to mlflow: MLflow refused to start a run at tracking URI "
                            f"{mlflow.get_tracking_uri()!r}: {exc.message}",
                            hint="set MLFLOW_TRACKING_URI to e.g. sqlite:///mlflow.db or http://host:5000 "
                                 "(a plain folder also needs MLFLOW_ALLOW_FILE_STORE=true on MLflow 3).") from None
        mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        mlflow.set_tag("tunesmith.output_dir", str(output_dir.resolve()))

    def log(self, entry: dict[str, Any]) -> None:
        figures = metrics_of(entry)
        if figures:
            self.mlflow.log_metrics(figures, step=int(entry["step"]))

    def finish(self, results: dict[str, Any] | None, output_dir: Path, status: str) -> None:
        mlflow = self.mlflow
        if results:
            mlflow.log_metrics({f"final_{k}": v for k, v in metrics_of(results).items()},
                               step=int(results.get("global_step", 0)))
        for name in ("training_loss.png", "train_results.json"):
            if (output_dir / name).is_file():
                mlflow.log_artifact(str(output_dir / name))
        mlflow.end_run(status=status)


class WandbTracker:
    def __init__(self) -> None:
        import wandb

        self.wandb = wandb
        self.run: Any = None

    def start(self, params: dict[str, Any], run_name: str, output_dir: Path) -> None:
        # Run files go into the run folder unless WANDB_DIR says otherwise; WANDB_MODE=offline
        # keeps them there for a later `wandb sync`.
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "tunesmith"), name=run_name,
                                   config=params, dir=os.environ.get("WANDB_DIR") or str(output_dir),
                                   reinit="create_new")

    def log(self, entry: dict[str, Any]) -> None:
        figures = metrics_of(entry)
        if figures:
            self.run.log(figures, step=int(entry["step"]))

    def finish(self, results: dict[str, Any] | None, output_dir: Path, status: str) -> None:
        if results:
            self.run.summary.update({f"final_{k}": v for k, v in metrics_of(results).items()})
        plot = output_dir / "training_loss.png"
        if results and plot.is_file():  # shown among the run's media, stored in its files even offline
            self.run.log({"training_loss": self.wandb.Image(str(plot))}, step=int(results.get("global_step", 0)))
        for name in ("training_loss.png", "train_results.json"):
            if (output_dir / name).is_file():
                self.run.save(str(output_dir / name), base_path=str(output_dir), policy="now")
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


_CLASSES: dict[str, type] = {"mlflow": MlflowTracker, "wandb": WandbTracker}


def check_installed(report_to: list[str], where: str = "config") -> None:
    """Name the missing library before any work, not after the model has loaded."""
    for name in requested(report_to):
        if importlib.util.find_spec(name) is None:
            raise UserError(f"{where}: 'report_to' names {name}, but the {name} package is not installed.",
                            hint=INSTALL_HINT)


def open_trackers(report_to: list[str], params: dict[str, Any], output_dir: Path) -> list[Tracker]:
    """Start one run per tracker named in report_to; the run is named after the run folder."""
    check_installed(report_to)
    trackers: list[Tracker] = []
    for name in requested(report_to):
        tracker = _CLASSES[name]()
        tracker.start(params, output_dir.resolve().name, output_dir)
        trackers.append(tracker)
    return trackers
