"""Chat messages -> the prompt text, with the tokenizer's chat template rendered as transformers renders it.

The template is the ``chat_template`` of the tokenizer (tokenizer_config.json or
chat_template.jinja beside tokenizer.json, as ``moec import hf`` copies them), rendered with
jinja2 in a sandbox with transformers' settings (``trim_blocks``, ``lstrip_blocks``, the
``loopcontrols`` extension, ``tojson``, ``raise_exception``, ``strftime_now``) and the
tokenizer's special tokens as variables. A byte-level model has no template; it gets
:data:`DEFAULT_TEMPLATE`: one ``role: content`` line per message, then ``assistant:``.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

DEFAULT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant:{% endif %}")


class ChatTemplateError(ValueError):
    pass


@lru_cache(maxsize=8)
def compiled(template: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatTemplateError(f"the chat template refused the messages: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as err:
        raise ChatTemplateError(f"the model's chat template does not compile: {err}") from None


def render_chat(messages: list[dict], template: str | None, special: dict) -> str:
    """The prompt text for ``messages`` ([{"role", "content"}, ...]), ending where the assistant's answer begins."""
    from jinja2 import TemplateError

    tokens = {name: value for name, value in special.items() if value is not None}
    try:
        return compiled(template or DEFAULT_TEMPLATE).render(messages=messages, add_generation_prompt=True, **tokens)
    except TemplateError as err:
        raise ChatTemplateError(f"the chat template failed on these messages: {err}") from None
