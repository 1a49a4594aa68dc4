"""The OpenAI fine-tuning chat format, rendered with a chat template; loss on assistant turns only.

Which tokens an assistant wrote is found by rendering prefixes of the conversation: the text from
the end of `messages[:i]` with the generation prompt to the end of `messages[:i+1]` is assistant
turn i (its content and the template's end-of-turn marker, which the model must learn to emit).
The whole conversation is tokenised once and a token is a target when the text it spans lies in
an assistant turn (offset mapping), so the masking does not depend on how a template happens to
tokenise at turn boundaries. Templates whose renderings are not prefixes of each other (some drop
earlier reasoning) are refused with the reason rather than masked wrongly.
"""
from __future__ import annotations

from muxtune.engine.data.examples import IGNORE, Example, RowError

ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplateError(ValueError):
    """No template to render with, or one the masking cannot follow."""


def chat_template(tokenizer, override: str | None) -> str:
    """The template a task renders with: dataset.chatTemplate, else the tokenizer's own."""
    template = override or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        raise ChatTemplateError(
            "dataset.format chat: the base model's tokenizer has no chat template; "
            "set dataset.chatTemplate to a Jinja chat template"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError("dataset.format chat needs a fast tokenizer (offsets mark the assistant tokens)")
    return template


def check_messages(row: dict, field: str) -> list[dict]:
    msgs = row.get(field)
    if not isinstance(msgs, list) or not msgs:
        raise RowError(f"{field!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RowError(f"message {i} is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RowError(f"message {i}: role must be one of {', '.join(ROLES)} (got {role!r})")
        if not isinstance(content, str):
            raise RowError(f"message {i}: content must be a string")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RowError("no assistant message: nothing to train on")
    return out


class ChatEncoder:
    """Conversation -> Example with targets on the assistant turns' tokens."""

    def __init__(self, tokenizer, template: str, max_len: int, train_on_prompt: bool = False):
        self.tokenizer, self.template, self.max_len = tokenizer, template, max_len
        self.train_on_prompt = train_on_prompt

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # noqa: BLE001 - jinja raises many kinds; all mean this template fails here
            raise RowError(f"the chat template cannot render it: {exc}") from None

    def spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns."""
        full = self._render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], generation_prompt=True) if i else self._render([], True)
            upto = self._render(messages[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ChatTemplateError(
                    f"the chat template renders assistant turn {i} differently inside the whole conversation, "
                    "so its tokens cannot be told apart; use a template whose renderings extend each other")
            spans.append((len(before), len(upto)))
        return full, spans

    def __call__(self, row_messages: list[dict]) -> list[Example]:
        text, spans = self.spans(row_messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])[: self.max_len]
        offsets = enc["offset_mapping"][: self.max_len]
        assistant = [any(a <= s and e <= b for a, b in spans) and e > s for s, e in offsets]
        targets = [ids[i + 1] if i + 1 < len(ids) and (self.train_on_prompt or assistant[i + 1]) else IGNORE
                   for i in range(len(ids))]
        return [Example(tuple(ids), tuple(targets))]
