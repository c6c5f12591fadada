"""Chat templates: conversations -> prompt text, rendered exactly as transformers'
``apply_chat_template(..., tokenize=False)`` renders them.

Same jinja2 environment as transformers: sandboxed (templates from the Hub are untrusted code),
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that
does not escape HTML, the ``raise_exception`` and ``strftime_now`` globals, and the variables
``messages``, ``add_generation_prompt``, ``tools``, ``documents`` and the tokenizer's special
tokens (``bos_token``, ``eos_token``, ...). The rendered text already holds whatever BOS the
template writes, so it is tokenized without adding special tokens (transformers' convention).

Never imports jax or anything else from jaxserve (the HTTP front end and tests use it without an
accelerator).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime

__all__ = ["ROLES", "ChatTemplateError", "render_chat", "validate_conversation",
           "validate_conversations"]

ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(ValueError):
    """A template that does not compile, or that raised while rendering."""


def validate_conversation(messages: object, where: str = "conversation") -> list[dict]:
    """A conversation is a non-empty list of {"role": one of ROLES, "content": str} dicts
    (other keys, e.g. "name" or "tool_calls", pass through to the template)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"{where} must be a list of messages, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError(f"{where} is empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"{where}: message {i} must be a dict with 'role' and 'content', "
                            f"got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: message {i} field 'role' must be one of "
                             f"{', '.join(ROLES)}, got {role!r}")
        if "content" not in message:
            raise ValueError(f"{where}: message {i} has no 'content'")
        content = message["content"]
        if not isinstance(content, str):
            raise TypeError(f"{where}: message {i} field 'content' must be a str, got "
                            f"{type(content).__name__}")
        out.append(dict(message))
    return out


def validate_conversations(conversations: object) -> tuple[list[list[dict]], bool]:
    """One conversation (a list of message dicts) or a list of them -> (conversations, batched)."""
    if isinstance(conversations, Sequence) and not isinstance(conversations, (str, bytes)) \
            and conversations and all(isinstance(c, Sequence) and not isinstance(c, (str, bytes))
                                      for c in conversations):
        return [validate_conversation(c, f"conversation {i}")
                for i, c in enumerate(conversations)], True
    return [validate_conversation(conversations)], False


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        # transformers' `{% generation %}` marks assistant text for masks; it renders its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body
                                          ).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                special_tokens: Mapping[str, str] | None = None, **variables) -> str:
    """Render one (validated) conversation with `template`."""
    import jinja2

    if not isinstance(template, str):
        raise TypeError(f"chat_template must be a str, got {type(template).__name__}")
    compiled = _compile(template)
    context = {**(special_tokens or {}), **variables}
    context.setdefault("tools", None)
    context.setdefault("documents", None)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **context)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e
