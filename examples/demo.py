"""`make demo`: the default model before and after a short LoRA fine-tune on the repository's identity data.

Steps: provision the default model, ask it "Who are you?", fill the placeholders of data/identity.json
into a copy, train with `tunesmith train` (the same command users run), ask again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "demo_identity_lora.yaml"
IDENTITY = REPO / "data" / "identity.json"
QUESTION = "Who are you?"
EXPORT = "exports/tunesmith-identity"  # the path the README's snippet loads


def prepare_data(data_dir: Path) -> None:
    """A copy of identity.json with the name and author filled in (data/identity.json is not touched)."""
    rows = json.loads(IDENTITY.read_text(encoding="utf-8"))
    for row in rows:
        row["output"] = row["output"].replace("{{name}}", "Tunesmith").replace("{{author}}", "the tunesmith team")
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "identity.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    (data_dir / "dataset_info.json").write_text(json.dumps({"identity_tunesmith": {"file_name": "identity.json"}}))


def ask(*, trained: bool) -> str:
    """The answer of the run's trained adapter, or of the base model alone (before training)."""
    from tunesmith.config import load_config
    from tunesmith.infer import ChatEngine
    from tunesmith.loading import base_model

    cfg = load_config(CONFIG)
    engine = ChatEngine(cfg, source=None if trained else base_model(cfg.model))
    return engine.chat([{"role": "user", "content": QUESTION}], do_sample=False, max_new_tokens=64).strip()


def main() -> int:
    t0 = time.time()
    from tunesmith.model.provision import provision_default_model

    print(f"default model: {provision_default_model()}")
    print(f"\n=== before fine-tuning ===\nQ: {QUESTION}\nA: {ask(trained=False)}\n", flush=True)
    prepare_data(REPO / "saves" / "demo" / "data")
    print(f"=== training: tunesmith train {CONFIG.relative_to(REPO)} ===", flush=True)
    subprocess.run([sys.executable, "-m", "tunesmith", "train", str(CONFIG)], cwd=REPO, check=True)
    answer = ask(trained=True)
    print(f"\n=== after fine-tuning ===\nQ: {QUESTION}\nA: {answer}\n", flush=True)
    print(f"=== export: tunesmith export {CONFIG.relative_to(REPO)} export_dir={EXPORT} ===", flush=True)
    subprocess.run([sys.executable, "-m", "tunesmith", "export", str(CONFIG), f"export_dir={EXPORT}"], cwd=REPO,
                   check=True)
    print("\n=== the README's plain-transformers snippet on the export ===", flush=True)
    exec(readme_snippet(), {})
    print(f"\ndemo finished in {time.time() - t0:.0f} s. Adapter: saves/demo/identity-lora, merged model: {EXPORT}\n"
          "chat with it: .venv/bin/tunesmith chat examples/demo_identity_lora.yaml")
    return 0 if "tunesmith" in answer.lower() else 1


def readme_snippet() -> str:
    """The README's "load the export with plain transformers" code block, run as written."""
    blocks = (REPO / "README.md").read_text(encoding="utf-8").split("```python\n")[1:]
    return next(b.split("```")[0] for b in blocks if "AutoModelForCausalLM.from_pretrained(path)" in b)


if __name__ == "__main__":
    raise SystemExit(main())
