"""`lowrax chat`: an interactive conversation with a model (and adapter), streamed token by token.

Each turn renders the whole conversation with the tokenizer's chat template and
generates the reply with the KV-cache generator, printing text as soon as it
decodes. `/reset` starts over, `/exit` (or end of input) leaves. With piped input the
transcript shows each turn as `you> ...` / `assistant> ...`.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from lowrax.errors import LowraxError
from lowrax.models.generate import SamplingConfig, eos_ids, generate_ids


class StreamPrinter:
    """Prints the text of a growing list of token ids as it decodes.

    Byte-level BPE splits some characters over several tokens; their partial
    decode ends in U+FFFD, which is held back until the character completes.
    """

    def __init__(self, tokenizer, out: TextIO, stop_ids: set[int]):
        self.tokenizer, self.out, self.stop_ids = tokenizer, out, stop_ids
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, new_ids) -> None:
        token = int(new_ids[0])
        if token in self.stop_ids:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[len(self.shown):] + "\n")
        self.out.flush()
        return text


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def chat_loop(model, params, tokenizer, *, sampling: SamplingConfig, max_new_tokens: int, seed: int = 0,
              system: str | None = None, read: Callable[[str], str] = input, out: TextIO = sys.stdout,
              interactive: bool = True) -> list[dict]:
    """Converse until `/exit` or end of input; returns the conversation's messages."""
    if not getattr(tokenizer, "chat_template", None):
        raise LowraxError("chat needs a chat template and this tokenizer has none",
                          cli="lowrax chat needs a chat template and this tokenizer has none; "
                              "use lowrax generate --chat off")
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    stops = eos_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    limit = getattr(model.config, "max_position_embeddings", None)
    turn = 0
    while True:
        try:
            line = read("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            out.write("(conversation cleared)\n")
            continue
        if not text:
            continue
        if not interactive:  # piped input is not echoed by a terminal: the transcript shows both turns
            out.write(f"you> {text}\n")
        messages.append({"role": "user", "content": text})
        prompt = chat_ids(tokenizer, messages)
        while limit and len(prompt) + max_new_tokens > limit and len(messages) > len(start) + 1:
            messages = start + messages[len(start) + 2:]  # the oldest exchange goes first
            prompt = chat_ids(tokenizer, messages)
        out.write("assistant> ")
        printer = StreamPrinter(tokenizer, out, set(stops))
        generate_ids(model, params, [prompt], max_new_tokens, sampling, stops, pad, seed + turn, on_token=printer)
        messages.append({"role": "assistant", "content": printer.finish()})
        turn += 1
    return messages
