"""Export stage: merge adapters into the base, write a stand-alone model folder, verify it.

The folder is written into a temporary sibling, loaded back with plain `transformers`, compared
with base+adapter on fixed prompts, and only then renamed into place: a failed export never
leaves a folder that looks usable.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config import RunConfig
from tunesmith.errors import UserError
from tunesmith.export_gguf import export_gguf, prompt_logits
from tunesmith.files import replace_folder
from tunesmith.loading import ModelSource, load, source_for
from tunesmith.template import encode_segments, end_of_turn_ids, render, stop_strings

# Prompts the exported model is checked on: short, multi-turn, with and without a system turn.
VERIFY_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello! Who are you?"}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And times 4?"},
    ],
]

# Largest logit difference accepted, relative to the largest reference logit (at least 1).
VERIFY_TOLERANCE = 1e-4


class ExportVerificationError(UserError):
    """The written model does not reproduce base+adapter; nothing was put at export_dir."""


def run_export(cfg: RunConfig, source: ModelSource | None = None) -> Path:
    """Merge, write, verify and publish `export_dir`; returns its path. The weights are the
    given source, else what the config names (loading.source_for)."""
    import torch

    if not cfg.export.export_dir:
        raise UserError(f"{cfg.source or 'config'}: 'export_dir' is not set; it names the folder the merged "
                        "model is written to.", hint="add e.g. `export_dir: exports/my-model`.")
    export_dir = Path(cfg.export.export_dir).expanduser().resolve()
    source = source or source_for(cfg)
    if source.model_args.quantization_bit:  # a QLoRA adapter is merged into the full-precision base
        print(f"note: quantization_bit {source.model_args.quantization_bit} is for training; export merges into "
              "the unquantized base.", file=sys.stderr)
        source = dataclasses.replace(source, model_args=dataclasses.replace(source.model_args, quantization_bit=None))
    _check_export_dir(export_dir, source, cfg)
    device = "cuda" if cfg.export.export_device == "auto" and torch.cuda.is_available() else "cpu"

    print(f"Exporting {source.description}", file=sys.stderr)
    # Merge in fp32: rounding happens once, when casting to the export dtype.
    model, tokenizer = load(source, dtype=torch.float32, device=device)
    prompts = [torch.tensor([encode_segments(c, tokenizer).ids]) for c in VERIFY_CONVERSATIONS]
    reference = prompt_logits(model, prompts)
    if source.adapters:
        model = model.merge_and_unload()
        merged = prompt_logits(model, prompts)
        merge_diff = _max_diff(merged, reference)
    else:
        merged, merge_diff = reference, 0.0
    scale = max(1.0, max(float(r.abs().max()) for r in reference))
    tolerance = VERIFY_TOLERANCE * scale
    gguf_dir = None
    if cfg.export.export_gguf:  # from the fp32 merged weights, before they are rounded below

        export_dir.parent.mkdir(parents=True, exist_ok=True)
        gguf_dir = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.gguf-", dir=export_dir.parent))
        eos_ids, _ = end_of_turn_ids(tokenizer, cfg.model.template, model.generation_config.eos_token_id)
        try:
            export_gguf(model, tokenizer, cfg.export.export_gguf, gguf_dir, prompts, name=export_dir.name,
                        end_of_turn=eos_ids)
        except BaseException:
            shutil.rmtree(gguf_dir, ignore_errors=True)
            raise

    dtype_name = _export_dtype_name(cfg, model)
    export_dtype = getattr(torch, dtype_name)
    if export_dtype == torch.float32:
        expected = merged
    else:
        # The written weights are rounded: expect the same rounding, computed in fp32. Only the
        # parameters are rounded; buffers such as RoPE frequencies are rebuilt in fp32 on load.
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(export_dtype).to(param.dtype))
        expected = prompt_logits(model, prompts)
    model = model.to(export_dtype)

    export_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.partial-", dir=export_dir.parent))
    try:
        max_shard_bytes = int(cfg.export.export_size * 10**9)
        _write_weights(model, staging, max_shard_bytes, cfg.export.export_legacy_format)
        tokenizer.save_pretrained(staging)
        eos_ids, _ = end_of_turn_ids(tokenizer, cfg.model.template, model.generation_config.eos_token_id)
        _write_generation_config(model, tokenizer, eos_ids, staging)
        gguf_files = [f.name for f in gguf_dir.iterdir()] if gguf_dir else []
        for name in gguf_files:
            shutil.move(gguf_dir / name, staging / name)
        modelfile = ollama_modelfile(tokenizer, cfg.model.template, cfg.generate.default_system,
                                     weights=f"./{gguf_files[0]}" if gguf_files else ".")
        (staging / "Modelfile").write_text(modelfile, encoding="utf-8")
        del model
        loaded_diff, base_diff = _verify(staging, prompts, expected, reference, tolerance, merge_diff)
        replace_folder(staging, export_dir)  # an earlier export is replaced only now, once verified
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if gguf_dir:
            shutil.rmtree(gguf_dir, ignore_errors=True)
    shards = sorted(p.name for p in export_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    print(f"Verified: plain transformers loads {export_dir} ({len(shards)} weight file(s), {dtype_name}); "
          f"largest logit difference vs base+adapter: {base_diff:.3g} "
          f"(merge {merge_diff:.3g}, files vs merged {loaded_diff:.3g}).", file=sys.stderr)
    return export_dir


def _check_export_dir(export_dir: Path, source: ModelSource, cfg: RunConfig) -> None:
    """Refuse folders whose replacement would destroy something that is not an earlier export."""
    protected = {Path(cfg.train.output_dir).expanduser().resolve()}
    if source.adapters:
        protected |= {Path(p).expanduser().resolve() for p in source.adapters}
    model_path = Path(source.model_args.model_name_or_path).expanduser()
    if model_path.is_dir():
        protected.add(model_path.resolve())
    if export_dir in protected:
        raise UserError(f"export_dir '{export_dir}' is the model, adapter or output_dir folder itself; "
                        "choose a new folder.")
    if export_dir.exists() and not export_dir.is_dir():
        raise UserError(f"export_dir '{export_dir}' is a file; choose a folder.")
    if export_dir.is_dir() and any(export_dir.iterdir()) and not (export_dir / "Modelfile").is_file():
        raise UserError(f"export_dir '{export_dir}' already holds files and is not an earlier export; "
                        "it would be replaced.", hint="choose a new or empty folder.")


def _export_dtype_name(cfg: RunConfig, model: Any) -> str:
    """`auto` keeps the dtype the base model was published in (its config), fp32 if unknown."""
    if cfg.export.export_dtype != "auto":
        return cfg.export.export_dtype
    import torch

    stored = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    return names.get(stored, "float32")


def _max_diff(a: list[Any], b: list[Any]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _write_weights(model: Any, folder: Path, max_shard_bytes: int, legacy: bool) -> None:
    """Sharded weights plus config.json. `legacy` turns each safetensors shard into a `.bin`
    (transformers only writes safetensors); the shard split stays the same."""
    model.save_pretrained(folder, max_shard_size=max_shard_bytes)
    if legacy:
        _safetensors_to_bin(folder)
    for shard in sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")):
        if shard.stat().st_size > max_shard_bytes:
            print(f"note: {shard.name} is {shard.stat().st_size / 1e9:.4g} GB, over export_size "
                  f"({max_shard_bytes / 1e9:.4g} GB): it holds one tensor larger than the limit, and a "
                  "tensor is never split across files.", file=sys.stderr)


def _safetensors_to_bin(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    renames: dict[str, str] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        new_name = shard.name.replace("model", "pytorch_model", 1).replace(".safetensors", ".bin")
        torch.save(load_file(shard), folder / new_name)
        shard.unlink()
        renames[shard.name] = new_name
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = {k: renames[v] for k, v in data["weight_map"].items()}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        index.unlink()


def _write_generation_config(model: Any, tokenizer: Any, eos_ids: list[int], folder: Path) -> None:
    """generation_config.json whose eos ids include the template's end of turn, so any
    `generate` stops where the chat template ends an answer."""
    gen = model.generation_config
    gen.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    gen.save_pretrained(folder)


def _verify(folder: Path, prompts: list[Any], expected: list[Any], reference: list[Any], tolerance: float,
            merge_diff: float) -> tuple[float, float]:
    """Load the folder with plain transformers and compare logits; raise if they differ."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loaded.eval()
    got = prompt_logits(loaded, prompts)
    del loaded
    loaded_diff = _max_diff(got, expected)
    base_diff = _max_diff(got, reference)
    if merge_diff > tolerance or loaded_diff > tolerance:
        what = ("merging changed the outputs" if merge_diff > tolerance
                else "the written files do not reproduce the merged model")
        raise ExportVerificationError(
            f"export verification failed: {what} (largest logit difference {max(merge_diff, loaded_diff):.3g} "
            f"> tolerance {tolerance:.3g}; vs base+adapter {base_diff:.3g}). Nothing was written to export_dir.")
    return loaded_diff, base_diff


# ---------------------------------------------------------------------------------------------
# Ollama Modelfile


@dataclass
class _ChatPieces:
    """A chat template seen as fixed text around each message's content."""

    head: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    default_system: str | None

    def render(self, messages: list[dict[str, str]]) -> str:
        """What the Go template below produces (Ollama inserts SYSTEM when no system turn is given)."""
        if self.default_system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        parts = [self.head]
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            parts.append(self.prefix[m["role"]] + m["content"])
            if not (last and m["role"] == "assistant"):
                parts.append(self.suffix[m["role"]])
            if last and m["role"] != "assistant":
                parts.append(self.generation)
        return "".join(parts)


def _chat_pieces(tokenizer: Any) -> _ChatPieces | None:
    """Find the text around each role's content by rendering marker conversations; None when the
    template is not of that shape (the result is checked against the real template)."""
    s, u, a, u2, a2 = "Qsysq7", "Qusrq7", "Qastq7", "Qusr2q7", "Qast2q7"
    msgs = [{"role": "system", "content": s}, {"role": "user", "content": u}, {"role": "assistant", "content": a},
            {"role": "user", "content": u2}, {"role": "assistant", "content": a2}]
    try:
        full = render(msgs, tokenizer)
        at = [full.index(x) for x in (s, u, a, u2, a2)]
        if at != sorted(at):
            return None
        with_gen = render(msgs[:2], tokenizer, add_generation_prompt=True)
        without_gen = render(msgs[:2], tokenizer)
        no_system = render(msgs[1:3], tokenizer)
    except (UserError, ValueError):
        return None
    if not with_gen.startswith(without_gen):
        return None
    generation = with_gen[len(without_gen):]
    asst_suffix = full[at[4] + len(a2):]
    between_a_u2 = full[at[2] + len(a):at[3]]
    between_s_u = full[at[0] + len(s):at[1]]
    between_u_a = full[at[1] + len(u):at[2]]
    if not (between_a_u2.startswith(asst_suffix) and between_u_a.endswith(generation)):
        return None
    user_prefix = between_a_u2[len(asst_suffix):]
    if not between_s_u.endswith(user_prefix):
        return None
    sys_suffix = between_s_u[: len(between_s_u) - len(user_prefix)]
    user_suffix = between_u_a[: len(between_u_a) - len(generation)]
    head_and_sys_prefix = full[:at[0]]
    marker = sys_suffix + user_prefix + u
    default_system = None
    if no_system.startswith(head_and_sys_prefix) and marker in no_system:
        # The template writes its own system turn when none is given.
        default_system = no_system[len(head_and_sys_prefix):no_system.index(marker)]
        head, sys_prefix = "", head_and_sys_prefix
    else:
        try:
            head = no_system[:no_system.index(user_prefix + u)]
        except ValueError:
            return None
        if not head_and_sys_prefix.startswith(head):
            return None
        sys_prefix = head_and_sys_prefix[len(head):]
    pieces = _ChatPieces(head, {"system": sys_prefix, "user": user_prefix, "assistant": generation},
                         {"system": sys_suffix, "user": user_suffix, "assistant": asst_suffix}, generation,
                         default_system)
    probes = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
         {"role": "user", "content": "how are you?"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
         {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    ]
    for probe in probes:
        if pieces.render(probe) != render(probe, tokenizer, add_generation_prompt=True):
            return None
    return pieces


def _go_literal(text: str) -> str:
    """Text for a Go template: verbatim unless it could be read as template syntax or end the block."""
    if "{{" in text or "}}" in text or '"""' in text:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"
    return text


def ollama_modelfile(tokenizer: Any, template_name: str | None, default_system: str | None = None,
                     weights: str = ".") -> str:
    """An Ollama Modelfile for this folder: the chat template in Go-template form (plain
    system/user/assistant chats) and the end-of-turn strings as stop parameters. SYSTEM follows
    `template.with_system`: `default_system` when set, else the template's own default. `weights`
    is what FROM names: the folder itself (safetensors), or the GGUF file in it."""
    _, multi = end_of_turn_ids(tokenizer, template_name)
    stops = list(dict.fromkeys([*stop_strings(tokenizer, template_name), *multi]))
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    lines = [f"FROM {weights}"]
    pieces = _chat_pieces(tokenizer)
    if pieces is None:
        lines.append("# The chat template could not be expressed as a Go template; write TEMPLATE by hand.")
    else:
        lit = _go_literal
        body = (
            lit(pieces.head)
            + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            + '{{ if eq .Role "system" }}' + lit(pieces.prefix["system"]) + "{{ .Content }}"
            + lit(pieces.suffix["system"])
            + '{{ else if eq .Role "user" }}' + lit(pieces.prefix["user"]) + "{{ .Content }}"
            + lit(pieces.suffix["user"])
            + '{{ else if eq .Role "assistant" }}' + lit(pieces.prefix["assistant"]) + "{{ .Content }}"
            + "{{ if not $last }}" + lit(pieces.suffix["assistant"]) + "{{ end }}"
            + "{{ end }}"
            + '{{ if and $last (ne .Role "assistant") }}' + lit(pieces.generation) + "{{ end }}"
            + "{{ end }}"
        )
        lines.append(f'TEMPLATE """{body}"""')
        system = default_system or pieces.default_system
        if system is not None:
            lines.append(f'SYSTEM """{system.replace(chr(34) * 3, "")}"""')
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    return "\n".join(lines) + "\n"


__all__ = ["ExportVerificationError", "ollama_modelfile", "run_export"]
