"""Chat templates: rendering a model's Jinja chat template the way Hugging Face does.

Templates come from model files, so they are untrusted code: they run in Jinja's immutable
sandbox. The environment offers what HF templates rely on: `trim_blocks` / `lstrip_blocks`,
`{% break %}` / `{% continue %}`, `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` filter
that does not HTML-escape (json.dumps with ensure_ascii=False, indent, separators, sort_keys), and
the `{% generation %}` block (rendered as its plain contents).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import PipeloadError


class ChatTemplateError(PipeloadError, ValueError):
    """A chat template did not parse, or refused the conversation (raise_exception, bad roles, ...)."""


class NoChatTemplateError(ChatTemplateError):
    """Chat messages were given to a model that ships no chat template."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text in HF templates; we just render it."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"the model's chat template does not parse: {e.message} (template line {e.lineno})") from e


def render_chat_template(
    template: str | None,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """The prompt text `template` makes of `messages` (extra keywords such as tools=... reach the template).

    Raises NoChatTemplateError if `template` is empty, ChatTemplateError if it does not parse or
    raises while rendering (e.g. roles that do not alternate), TypeError for malformed messages.
    """
    if not template:
        raise NoChatTemplateError(
            "this model has no chat template, so chat messages cannot be turned into a prompt; "
            "pass a plain text prompt instead")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TypeError(f"chat messages must be a list of dicts like {{'role': 'user', 'content': '...'}}, "
                        f"got {messages!r:.200}")
    compiled = _compile(template)
    extra.setdefault("tools", None)  # HF always defines these, and templates test `tools is not none`
    extra.setdefault("documents", None)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template rejected these messages: {e}") from e
    except (TypeError, ValueError, LookupError, ArithmeticError, AttributeError) as e:
        raise ChatTemplateError(f"the model's chat template failed on these messages: "
                                f"{type(e).__name__}: {e}") from e
