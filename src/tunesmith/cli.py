"""The `tunesmith` command: a thin shell over the pipeline's functions.

Each subcommand imports its stage lazily so that `--help` and `version` start fast.
User errors print without a traceback (docs/ARCHITECTURE.md, "Errors").
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tunesmith import __version__
from tunesmith.errors import UserError

if TYPE_CHECKING:
    from tunesmith.config import RunConfig

_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")

CONFIG_EPILOG = """\
The config is a LLaMA-Factory-style YAML file; any key can be overridden after it as
key=value, e.g.  tunesmith train cfg.yaml learning_rate=1e-5 max_steps=100
`tunesmith train --keys` lists every key with its default and meaning."""


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key")


def cmd_train(args: argparse.Namespace) -> int:
    from tunesmith.config import load_config
    from tunesmith.env import seconds_since_start
    from tunesmith.train import run_training
    from tunesmith.train.distributed import maybe_relaunch

    cfg = load_config(args.config, args.overrides)  # a bad config fails here, once, before any launch
    # A LLaMA-Factory predict YAML: do_predict with only an eval_dataset (or do_train: false) trains nothing.
    if cfg.finetune.do_predict and not (cfg.finetune.do_train and cfg.data.dataset):
        return _predict(cfg)
    # Several GPUs (or FORCE_TORCHRUN=1): rerun this command under torchrun, one process per GPU.
    code = maybe_relaunch(["train", args.config, *args.overrides], cfg)
    if code is not None:
        return code
    # The run's times (first step, runtime) count from the command, the interpreter's start and
    # the imports included; main() called from a longer-lived Python process counts from the call.
    run_training(cfg, started=time.time() - seconds_since_start() if args.own_command_line else None)
    if cfg.finetune.do_predict and os.environ.get("RANK", "0") == "0":  # under torchrun: the first process only
        return _predict(cfg)
    return 0


def _predict(cfg: RunConfig) -> int:
    from tunesmith.evaluate import run_eval

    run_eval(cfg)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tunesmith.config import load_config
    from tunesmith.evaluate import run_eval

    run_eval(load_config(args.config, args.overrides), out_dir=args.out, compare_base=args.compare_base,
             greedy=not args.sample)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tunesmith.config import load_config
    from tunesmith.infer import chat_cli

    return chat_cli(load_config(args.config, args.overrides), system=args.system)


def cmd_export(args: argparse.Namespace) -> int:
    from tunesmith.config import load_config
    from tunesmith.export import run_export

    run_export(load_config(args.config, args.overrides))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from tunesmith.config import load_config

    try:
        from tunesmith.api import serve
    except ModuleNotFoundError as exc:
        raise UserError(f"the API server needs {exc.name}, which is not installed.",
                        hint="pip install 'tunesmith[api]'") from None

    serve(load_config(args.config, args.overrides), host=args.host, port=args.port)
    return 0


def cmd_webui(args: argparse.Namespace) -> int:
    from tunesmith.ui import launch

    launch(host=args.host, port=args.port, root=args.root, auth=args.auth)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_cmd == "templates":
        from tunesmith.template import TEMPLATES

        for name in sorted(TEMPLATES):
            print(name)
        return 0
    from tunesmith.config import load_config
    from tunesmith.data.pipeline import dump, preview
    from tunesmith.model.load import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.model)
    if args.data_cmd == "preview":
        preview(cfg, tokenizer, n=args.n, color=None if not args.no_color else False)
    elif args.data_cmd == "dump":
        dump(cfg, tokenizer, args.out)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from tunesmith.env import environment_report
    from tunesmith.files import cache_dir
    from tunesmith.model.provision import is_provisioned, provision_default_model

    if args.provision:
        print(provision_default_model())
        return 0
    print(environment_report())
    state = "provisioned" if is_provisioned() else "not provisioned yet"
    print(f"cache dir: {cache_dir()} (default model {state})")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"tunesmith {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunesmith",
        description="Supervised fine-tuning of language models: train, chat, export and serve.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with:  tunesmith train examples/demo_identity_lora.yaml\n"
               "then:        tunesmith chat examples/demo_identity_lora.yaml",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str, description: str,
            epilog: str | None = CONFIG_EPILOG) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=fmt)
        p.set_defaults(func=func)
        return p

    p = add("train", cmd_train, "fine-tune a model (LoRA, freeze or full)",
            "Fine-tune the model named in the config on its datasets. Writes checkpoints, logs and the\n"
            "trained adapter or model into output_dir.")
    _add_config_args(p)
    p = add("chat", cmd_chat, "chat with a model or a trained adapter in the terminal",
            "Interactive chat. Given the YAML a run was trained with, it loads that run's result.\n"
            "Type 'clear' to start over, 'exit' to quit. With piped stdin: one message per line.")
    _add_config_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p = add("eval", cmd_eval, "score a model's generated answers on the eval set (BLEU-4, ROUGE)",
            "Answer every sample of eval_dataset (else dataset) with the model `tunesmith chat` would load\n"
            "for this config (adapter_name_or_path, else the trained result in output_dir, else the base),\n"
            "and compare each answer with the sample's own last assistant message.\n\n"
            "Prompts are rendered with the training template and generated in batches of\n"
            "per_device_eval_batch_size (left padded), greedy unless --sample; max_new_tokens and\n"
            "repetition_penalty apply. Scores, x100: BLEU-4 over the whole set (sacrebleu) and the mean\n"
            "ROUGE-1/2/L F1 (rouge-score). Chinese/Japanese/Korean text counts one token per character,\n"
            "other text one per word. Writes generated_predictions.jsonl (prompt, predict, label, dataset,\n"
            "row) and predict_results.json to output_dir (or --out); --compare-base also scores the base\n"
            "model (files *_base.*) and prints both side by side.\n\n"
            "Example:  tunesmith eval examples/demo_identity_lora.yaml --compare-base max_new_tokens=64")
    _add_config_args(p)
    p.add_argument("--compare-base", action="store_true", help="also score the base model, without the training")
    p.add_argument("--out", default=None, help="folder for the result files (default: output_dir)")
    p.add_argument("--sample", action="store_true",
                   help="sample with the config's temperature/top_p/top_k instead of greedy decoding")
    p = add("export", cmd_export, "merge an adapter into its base and write a stand-alone model",
            "Merge adapter(s) into the base model, write sharded safetensors to export_dir and verify\n"
            "that plain transformers loads them with the same logits.")
    _add_config_args(p)
    p = add("api", cmd_api, "serve an OpenAI-compatible chat API",
            "OpenAI-compatible server: GET /v1/models, POST /v1/chat/completions (stream or not).\n"
            "Binds 127.0.0.1:8000 unless told otherwise; set API_KEY to require a Bearer token.\n"
            "One generation at a time; API_MAX_QUEUE (default 64) requests may wait, more get 429.\n"
            "The request schema is at /docs.")
    _add_config_args(p)
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1, env API_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000, env API_PORT)")
    p = add("webui", cmd_webui, "train, watch, chat and export in the browser",
            "A web page to configure and launch runs, watch the loss, chat and export.\n"
            "It reads and writes only inside --root; off loopback it needs --auth.", epilog=None)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--root", default=None, help="workspace folder: every path the page reads or writes must lie "
                                                "inside it (default: the current folder)")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="login for the page; required to bind anything but a loopback address "
                        "(default: env TUNESMITH_WEBUI_AUTH)")

    p = add("data", cmd_data, "inspect how datasets are rendered and masked",
            "See exactly what training will see.", epilog=None)
    dsub = p.add_subparsers(dest="data_cmd", metavar="ACTION", required=True)
    dp = dsub.add_parser("preview", help="print rendered samples with the trained tokens marked",
                         description="Print N rendered samples; trained tokens are coloured on a terminal,\n"
                                     "[[bracketed]] when piped.", epilog=CONFIG_EPILOG, formatter_class=fmt)
    _add_config_args(dp)
    dp.add_argument("-n", type=int, default=3, help="number of samples (default 3)")
    dp.add_argument("--no-color", action="store_true", help="mark trained tokens with brackets")
    dd = dsub.add_parser("dump", help="write the token ids and labels of every sample as JSONL",
                         description="One line per sample: source, input_ids, labels (-100 = not trained),\n"
                                     "in dataset order.", epilog=CONFIG_EPILOG, formatter_class=fmt)
    _add_config_args(dd)
    dd.add_argument("--out", required=True, help="output .jsonl file")
    dsub.add_parser("templates", help="list the named chat templates")

    p = add("env", cmd_env, "versions, device and threads, for bug reports",
            "Print library versions, the compute device and thread settings.", epilog=None)
    p.add_argument("--provision", action="store_true", help="provision the default model and print its folder")
    add("version", cmd_version, "print the version", "Print the tunesmith version.", epilog=None)
    for name in ("train", "chat", "eval", "export", "api"):
        sub.choices[name].add_argument("--keys", action="store_true", help="list every config key and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own_command_line = argv == sys.argv[1:]  # this process was started as this command
    if own_command_line:
        _fewer_full_collections()
    parser = build_parser()
    if any(a == "--keys" for a in argv):
        from tunesmith.config import help_table

        print("Config keys (YAML or key=value):" + help_table())
        return 0
    # key=value overrides may stand anywhere after the config path, also after options like -n 2.
    overrides = [a for a in argv if _OVERRIDE.match(a)]
    args = parser.parse_args([a for a in argv if not _OVERRIDE.match(a)])
    args.own_command_line = own_command_line
    if hasattr(args, "overrides"):
        args.overrides = overrides
    elif overrides:
        parser.error(f"'{overrides[0]}': this command takes no key=value overrides")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if args.own_command_line:
            _before_exit()


def _fewer_full_collections() -> None:
    """Python's full garbage collection walks every live object, and starts again each time the
    objects that outlived the younger collections reach a quarter of those it last walked. A
    command's imports and model loading create some 350,000 such objects (torch, transformers,
    the model), none of them garbage: seven full walks, 0.7 s of the start-up (bench/RESULTS.md).
    A full collection now waits for 1,000 collections of the middle generation instead of 10;
    the young collections, which free nearly all cyclic garbage, run as before. Only in a
    process started as this command, never in one that goes on (a test, a notebook)."""
    import gc

    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1000)


def _before_exit() -> None:
    """The process ends when its command returns. At exit Python would walk the 300,000 objects of
    torch and transformers in its final garbage collections, about a second of every command;
    frozen, they are left out of those walks. The rest of an exit stays: atexit handlers and
    weakref.finalize callbacks run, streams are flushed, objects are freed by their reference
    counts; only the finalizers of objects held in reference cycles no longer run (Python does
    not promise them at exit; tunesmith closes its files and trackers itself). Never in a
    process that goes on (a test, a notebook): what it freezes would never be collected."""
    import gc

    gc.freeze()


if __name__ == "__main__":
    raise SystemExit(main())
