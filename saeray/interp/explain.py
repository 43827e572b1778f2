"""Explaining a (neuron, head) pair and scoring the explanation (methods.md §5.5-5.6; wave2.md §2):
the explainer and classifier prompts in the authors' structure, the answer parser, and the one
small protocol every explainer follows, delphi's ``generate(messages) -> text``.

* Explainer prompt, in the authors' order: we study attention heads that look for something in
  short documents; this head helps predict the next token "<tok>" but is active only in some
  documents; explain what makes it active; the active and the inactive examples (each a trimmed
  prompt with the target token appended) as triple-quoted bullet lists; answer in 2-3 sentences.
* Classifier prompt: the explanation (newlines as spaces), "Is the given example an active
  example? (Yes/No)", the example in triple quotes, "Answer: ".
* Answers: yes / no, case and trailing punctuation ignored; anything else is *unparsed* and counted
  as a wrong answer by :func:`saeray.sweeps.stats.balanced_accuracy`, never dropped (the authors'
  notebook silently drops them).
"""
from __future__ import annotations

import re
from typing import Protocol

Messages = list[dict]


class Explainer(Protocol):
    """delphi's client shape: one call, chat messages in, text out."""

    def generate(self, messages: Messages, max_tokens: int) -> str: ...


class LLMExplainer:
    """Any OpenAI-compatible endpoint through :class:`saeray.interp.client.LLMClient` (retries,
    timeouts, rate limits there)."""

    def __init__(self, client):
        self.client = client

    def generate(self, messages: Messages, max_tokens: int) -> str:
        return self.client.chat(messages, max_tokens=max_tokens)


EXPLAIN_TOKENS = 200     # the authors' max_tokens for an explanation
CLASSIFY_TOKENS = 3      # theirs is 1; a chat model may start with a space or "Yes,"


def _bullets(examples: list[str]) -> str:
    return "\n".join(f'- """{e}"""' for e in examples)


def explain_messages(token: str, active: list[str], inactive: list[str]) -> Messages:
    text = (
        "We are studying attention heads in a transformer language model. Each head looks for some particular "
        "thing in a short document.\n"
        f'This attention head helps the model predict the next token "{token}", but it is active only in some '
        "documents. Look at the documents where it is active and where it is not, and explain what makes it "
        "active.\n\n"
        f"Active examples (the predicted token is at the end):\n{_bullets(active)}\n\n"
        f"Inactive examples:\n{_bullets(inactive)}\n\n"
        "In 2-3 sentences, describe when this attention head is active.")
    return [{"role": "user", "content": text}]


def classify_messages(explanation: str, example: str) -> Messages:
    text = (f"{' '.join(explanation.split())}\n"
            "Is the given example an active example? (Yes/No)\n"
            f'"""{example}"""\n'
            "Answer: ")
    return [{"role": "user", "content": text}]


_ANSWER = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def parse_yes_no(text: str) -> bool | None:
    """True for yes, False for no (first word, case and punctuation ignored); None otherwise."""
    m = _ANSWER.match(text or "")
    return None if m is None else m.group(1).lower() == "yes"
