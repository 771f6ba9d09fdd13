"""Inference stage: one ChatEngine behind `tunesmith chat`, the API and the web UI.

Prompts are built by the same renderer training uses, so a trained model sees at inference
exactly the text it learned from, and generation stops at the template's end of turn.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tunesmith.config import RunConfig
from tunesmith.env import bf16_supported
from tunesmith.errors import UserError
from tunesmith.loading import ModelSource, load, source_for
from tunesmith.template import Conversation, Segmented, encode_segments, end_of_turn_ids, stop_strings, with_system

GENERATION_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "do_sample")
# Below this temperature sampling is greedy decoding: dividing logits by a tinier value overflows them.
GREEDY_BELOW_TEMPERATURE = 1e-2


@dataclass
class Usage:
    """Token counts and why generation ended ('stop' or 'length'), filled in by a finished reply."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"


def check_backend(cfg: RunConfig) -> None:
    if cfg.model.infer_backend != "huggingface":
        raise UserError(f"{cfg.source or 'config'}: infer_backend '{cfg.model.infer_backend}' is not available "
                        "in tunesmith; only 'huggingface' (transformers) is built.",
                        hint="set infer_backend: huggingface, or remove the key.")


def _device_and_dtype() -> tuple[str, Any]:
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if bf16_supported("cuda") else torch.float16
    return "cpu", torch.float32


class _Cancel:
    """A stopping criterion that ends generation when the reader goes away (client disconnect, Ctrl-C)."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self.event = event or threading.Event()

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _StopTrimmer:
    """Streams text but cuts it at the first stop string, holding back any tail that may be
    the start of one so that no part of a stop string is ever shown."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class ChatEngine:
    """A model and its tokenizer, loaded once; one generation at a time (a lock queues the rest)."""

    def __init__(self, cfg: RunConfig, *, source: ModelSource | None = None, device: str | None = None,
                 dtype: Any = None) -> None:
        check_backend(cfg)
        self.cfg = cfg
        auto_device, auto_dtype = _device_and_dtype()
        self.device = device or auto_device
        self.source = source or source_for(cfg)
        self.model, self.tokenizer = load(self.source, dtype=dtype or auto_dtype, device=self.device)
        self.description = self.source.description
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        self.eos_ids, self.multi_token_stops = end_of_turn_ids(self.tokenizer, cfg.model.template, gen_eos)
        # Cut from the shown text too: an end-of-turn that is an ordinary token is decoded like any other.
        self.stop_texts = stop_strings(self.tokenizer, cfg.model.template)
        self.cutoff_len = cfg.data.cutoff_len
        self.default_system = cfg.generate.default_system
        self.lock = threading.Lock()
        self.last_usage = Usage()

    # -- prompts ---------------------------------------------------------------------------

    def _with_system(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return with_system(messages, self.default_system)

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of the conversation rendered by the training template, ready for the answer."""
        return self.encode_prompt(messages).ids

    def encode_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                      source: tuple[str, int] = ("", -1)) -> Segmented:
        """The prompt as chat feeds it (default_system applied), text and ids, encoded once."""
        conv = Conversation(self._with_system(messages), tools, source)
        return encode_segments(conv, self.tokenizer, add_generation_prompt=True)

    def fit(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        """Drop the oldest turns (never the system prompt or the last user message) until the
        prompt fits cutoff_len; returns (messages kept, number dropped)."""
        kept = list(messages)
        dropped = 0
        while len(self.prompt_ids(kept)) > self.cutoff_len:
            first = next((i for i, m in enumerate(kept) if m.get("role") != "system"), None)
            later_user = None if first is None else next(
                (i for i in range(first + 1, len(kept)) if kept[i].get("role") == "user"), None)
            if later_user is None:
                raise UserError(f"the message is {len(self.prompt_ids(kept))} tokens long with the chat template, "
                                f"more than cutoff_len ({self.cutoff_len}).",
                                hint="send a shorter message or raise cutoff_len.")
            dropped += later_user - first
            del kept[first:later_user]
        return kept, dropped

    # -- generation ------------------------------------------------------------------------

    def generation_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """The config's generation settings with per-call overrides; temperature 0 means greedy."""
        g = self.cfg.generate
        settings = {k: getattr(g, k) for k in GENERATION_KEYS}
        settings.update({k: v for k, v in overrides.items() if k in GENERATION_KEYS and v is not None})
        greedy = not settings["do_sample"] or settings["temperature"] < GREEDY_BELOW_TEMPERATURE
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(settings["max_new_tokens"]),
            "repetition_penalty": float(settings["repetition_penalty"]),
            "do_sample": not greedy,
        }
        if greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=float(settings["temperature"]), top_p=float(settings["top_p"]),
                          top_k=int(settings["top_k"]))
        return kwargs

    def stream_chat(self, messages: list[dict[str, Any]], *, stop: list[str] | None = None,
                    usage: Usage | None = None, cancel: threading.Event | None = None,
                    **gen: Any) -> Iterator[str]:
        """Yield the reply's text as it is generated. `stop`: extra stop strings (not shown).
        `usage` (and `last_usage`) gets the token counts once the reply is finished.
        `cancel`: set from another thread, it ends the generation at the next token."""
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        kwargs = self.generation_kwargs(**gen)
        extra_stops = [s for s in (stop or []) if s]
        messages, _ = self.fit(messages)
        ids = self.prompt_ids(messages)
        usage = usage if usage is not None else Usage()
        trimmer = _StopTrimmer(self.stop_texts + extra_stops)
        stopper = _Cancel(cancel)
        with self.lock:
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            input_ids = torch.tensor([ids], device=self.model.device)
            result: dict[str, Any] = {}
            string_stops = self.multi_token_stops + extra_stops

            def work() -> None:
                try:
                    result["output"] = self.model.generate(
                        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                        eos_token_id=self.eos_ids, pad_token_id=self._pad_id(),
                        stopping_criteria=StoppingCriteriaList([stopper]),
                        stop_strings=string_stops or None, tokenizer=self.tokenizer if string_stops else None,
                        **kwargs)
                except BaseException as exc:  # re-raised in the reading thread
                    result["error"] = exc
                    streamer.end()

            thread = threading.Thread(target=work, name="tunesmith-generate", daemon=True)
            thread.start()
            try:
                for piece in streamer:
                    text = trimmer.feed(piece)
                    if text:
                        yield text
                tail = trimmer.flush()
                if tail:
                    yield tail
            finally:
                stopper.event.set()  # the reader may have stopped early: end generation now
                thread.join()
            if "error" in result:
                raise result["error"]
            new = result["output"][0, len(ids):].tolist()
            usage.prompt_tokens = len(ids)
            usage.completion_tokens = len(new)
            ended = bool(new) and new[-1] in self.eos_ids
            usage.finish_reason = "stop" if ended or trimmer.stopped or len(new) < kwargs["max_new_tokens"] \
                else "length"
            self.last_usage = usage

    def chat(self, messages: list[dict[str, Any]], *, stop: list[str] | None = None, usage: Usage | None = None,
             **gen: Any) -> str:
        """The whole reply at once."""
        return "".join(self.stream_chat(messages, stop=stop, usage=usage, **gen))

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_ids[0]


def chat_cli(cfg: RunConfig, system: str | None = None) -> int:
    """Interactive terminal chat; with piped stdin, one user message per line."""
    from transformers.utils import logging as hf_logging

    interactive = sys.stdin.isatty()
    hf_logging.disable_progress_bar()
    engine = ChatEngine(cfg)
    print(f"Loaded {engine.description}.", file=sys.stderr)
    if interactive:
        with contextlib.suppress(ImportError):  # line editing and history for input(), where available
            import readline  # noqa: F401
        print("Type a message. 'clear' starts a new conversation, 'exit' quits.", file=sys.stderr)
    system_turn = [{"role": "system", "content": system}] if system else []
    history: list[dict[str, Any]] = []
    while True:
        if interactive:
            try:
                line = input("User: ")
            except EOFError:
                print(file=sys.stderr)
                return 0
        else:
            line = sys.stdin.readline()
            if not line:
                return 0
        text = line.strip()
        if not text:
            continue
        if text.lower() == "exit":
            return 0
        if text.lower() == "clear":
            history = []
            print("History cleared.", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        kept, dropped = engine.fit(system_turn + history)
        if dropped:
            history = kept[len(system_turn):]
            print(f"(the {dropped} oldest message(s) were dropped to fit cutoff_len {engine.cutoff_len})",
                  file=sys.stderr)
        print("Assistant: ", end="", flush=True)
        pieces: list[str] = []
        stream = engine.stream_chat(system_turn + history)
        try:
            for piece in stream:
                pieces.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            stream.close()
            print(" [stopped]", end="")
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(pieces)})
