"""Training state inside a checkpoint: optimizer, scheduler, RNG streams and the step counter,
saved so that a resumed run continues bit for bit (docs/ARCHITECTURE.md, "The run folder").
How checkpoint folders are written and found is run_folder's job."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.errors import UserError
from tunesmith.run_folder import STATE

# --------------------------------------------------------------------------- RNG state

def rng_state() -> dict[str, Any]:
    """The RNG states as tensors and plain numbers, so they load with torch.load(weights_only=True)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- training state

def save_training_state(folder: Path, *, optimizer: torch.optim.Optimizer | None,
                        scheduler: Any, state: dict[str, Any]) -> None:
    if optimizer is not None:
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
        torch.save(rng_state(), folder / "rng_state.pt")
    (folder / STATE).write_text(json.dumps(state, indent=2))


def load_training_state(folder: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    if not (folder / "optimizer.pt").exists():
        raise UserError(f"{folder} was saved with save_only_model: true and holds no optimizer state; "
                        "it cannot be resumed exactly.", hint="load its weights as a new run instead.")
    try:  # weights_only: a checkpoint from elsewhere cannot run code when it is loaded
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(folder / "rng_state.pt", weights_only=True))
    except (RuntimeError, KeyError, TypeError, ValueError, EOFError) as exc:
        with contextlib.suppress(Exception):
            exc = str(exc).splitlines()[0]
        raise UserError(f"{folder}: the training state could not be read: {exc}",
                        hint="resume from another checkpoint, or start afresh.") from None
    return json.loads((folder / STATE).read_text())
