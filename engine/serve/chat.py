"""Chat messages -> prompt token ids.

A tokenizer with its own chat template uses it. One without (the built-in byte-level models)
gets muxtune's plain template: the messages' contents in order, each assistant turn closed by
EOS, after BOS, with no role markers. That is exactly the layout muxtune trains prompt/completion
pairs in (`<s> prompt completion </s>`), so `{"role": "user", "content": PROMPT}` asks an adapter
for what training taught it to answer to PROMPT. `--chat-template FILE` replaces either.
"""
from __future__ import annotations

PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A completion prompt as training encodes one: BOS, then the text's tokens."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(tokenizer, messages: list[dict], template: str | None = None) -> list[int]:
    own = template or getattr(tokenizer, "chat_template", None)
    if own:
        out = tokenizer.apply_chat_template(messages, chat_template=own, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
    text = tokenizer.apply_chat_template(messages, chat_template=PLAIN_TEMPLATE, add_generation_prompt=True,
                                         tokenize=False)
    return encode_prompt(tokenizer, text)
