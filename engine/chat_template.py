"""Chat-template rendering with the semantics of HF transformers (sandboxed jinja2)."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mtpserve.engine.errors import RequestError


class TemplateRaised(jinja2.TemplateError):
    """Raised by the template itself through ``raise_exception(message)``."""


def _raise_exception(message):
    raise TemplateRaised(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's filter: no HTML escaping and non-ASCII kept, unlike jinja2's built-in tojson.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}`` (HF assistant-mask marker):
    renders its body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


@lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    """Compile once per template string."""
    return _ENV.from_string(template)


@lru_cache(maxsize=32)
def template_variables(template: str) -> frozenset[str]:
    """The variables a template reads from its context (``tools``: it renders tools itself);
    empty for a template that does not parse (rendering then reports it)."""
    try:
        return frozenset(meta.find_undeclared_variables(_ENV.parse(template)))
    except jinja2.TemplateSyntaxError:
        return frozenset()


def render_chat_template(
    template: str,
    messages,
    *,
    add_generation_prompt: bool,
    bos_token: str | None,
    eos_token: str | None,
    **extra,
) -> str:
    """Render ``messages`` (passed to the template as is) like
    ``apply_chat_template(tokenize=False)``.

    Raises RequestError when the template rejects the conversation or cannot render it.
    """
    try:
        compiled = compile_template(template)
    except jinja2.TemplateSyntaxError as e:
        raise RequestError(f"the model's chat template is invalid: {e}") from None
    context = {"messages": messages, "tools": None, "documents": None, **extra}
    context["add_generation_prompt"] = add_generation_prompt
    for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
        if token is not None:
            context.setdefault(name, token)
    try:
        return compiled.render(**context)
    except TemplateRaised as e:
        raise RequestError(str(e), param="messages") from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise RequestError(f"chat template failed to render these messages: {e}",
                           param="messages") from None
