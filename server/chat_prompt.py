"""A chat request rendered to its prompt: messages (tool calls and results, reasoning) in the
shape chat templates expect, the tools, the template variables, and how the answer is read."""

from __future__ import annotations

import json

from mtpserve.engine.chat_template import render_chat_template, template_variables
from mtpserve.engine.errors import RequestError
from mtpserve.server.chat_output import OutputSpec
from mtpserve.server.errors import APIError
from mtpserve.server.reasoning import CLOSE, ends_in_thinking, uses_thinking
from mtpserve.server.tool_parsers import format_for

# names the server sets itself: a request's chat_template_kwargs cannot replace them
RESERVED = ("messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token")

FALLBACK_INTRO = (
    "# Tools\n\nYou can call the functions described below, as JSON objects between <tools> "
    "and </tools>:\n<tools>\n"
)
FALLBACK_USAGE = (
    "\n</tools>\n\nTo call one, answer with its name and a JSON object of arguments between "
    "<tool_call> and </tool_call>, one block per call:\n<tool_call>\n"
    '{"name": "function name", "arguments": {"argument": "value"}}\n</tool_call>'
)


class ServerChatSettings:
    """The server's choices for every chat request (serve's flags)."""

    def __init__(self, chat_template: str | None = None, reasoning_parser: str = "auto",
                 tool_call_parser: str = "auto", default_template_kwargs: dict | None = None):
        self.chat_template = chat_template  # None: the model's
        self.reasoning_parser = reasoning_parser
        self.tool_call_parser = tool_call_parser
        self.default_template_kwargs = default_template_kwargs or {}


def is_text_part(part: dict) -> bool:
    """``{"type": "text", "text": str}`` and nothing else."""
    if part.get("type") != "text" or not isinstance(part.get("text"), str):
        return False
    return not set(part) - {"type", "text"}


def text_of(i: int, content) -> str:
    """A message's content as text (its text parts joined); ValueError for other parts."""
    if not isinstance(content, list):
        return content or ""
    texts = []
    for part in content:
        if not is_text_part(part):
            raise ValueError(f"messages[{i}].content: only text parts are supported, "
                             f"got {part.get('type')!r}")
        texts.append(part["text"])
    return "".join(texts)


def call_dicts(i: int, tool_calls) -> list[dict]:
    """Assistant tool calls with their arguments as objects (templates iterate over them)."""
    out = []
    for call in tool_calls:
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise ValueError(f"messages[{i}].tool_calls: the arguments of "
                             f"{call.function.name!r} are not a JSON object")
        function = {"name": call.function.name, "arguments": arguments}
        out.append({"id": call.id, "type": "function", "function": function})
    return out


def message_dicts(messages) -> list[dict]:
    """Messages for the chat template. ValueError naming the field for what cannot be rendered."""
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        entry = {"role": role, "content": text_of(i, m.content)}
        if m.name is not None:
            entry["name"] = m.name
        if m.tool_calls:
            entry["tool_calls"] = call_dicts(i, m.tool_calls)
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        if m.reasoning_content is not None:
            entry["reasoning_content"] = m.reasoning_content
        out.append(entry)
    return out


def hermes_call_text(call: dict) -> str:
    function = call["function"]
    body = json.dumps({"name": function["name"], "arguments": function["arguments"]},
                      ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def with_tools_in_prompt(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The fallback for a template that does not render tools: the tools described in the
    system prompt in the Hermes format, calls written as ``<tool_call>`` blocks and results
    sent as user messages in ``<tool_response>`` blocks."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            blocks = [hermes_call_text(c) for c in calls]
            m["content"] = "\n".join([m["content"], *blocks]).strip("\n")
        if m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        out.append(m)
    if not tools:
        return out
    lines = [json.dumps(t, ensure_ascii=False) for t in tools]
    text = FALLBACK_INTRO + "\n".join(lines) + FALLBACK_USAGE
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


def template_kwargs(settings: ServerChatSettings, body) -> dict:
    kwargs = dict(settings.default_template_kwargs)
    kwargs.update(body.chat_template_kwargs or {})
    for name in RESERVED:
        if name in kwargs:
            raise APIError(400, f"chat_template_kwargs cannot set {name!r}",
                           "chat_template_kwargs")
    if body.reasoning_effort is not None:
        kwargs["reasoning_effort"] = body.reasoning_effort
    return kwargs


def active_tools(body) -> list[dict] | None:
    """The tools the model may call (None when there are none or tool_choice is "none"); a 400
    for a choice that names no declared tool."""
    tools = body.tools or []
    choice = getattr(body, "tool_choice", None)
    if choice is not None and choice != "none" and choice != "auto" and not tools:
        raise APIError(400, "tool_choice needs tools", "tool_choice")
    if hasattr(choice, "function"):
        names = [t.function.name for t in tools]
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not "
                                "among the tools", "tool_choice")
    if not tools or choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in tools]


def forced_function(body) -> tuple[bool, str | None]:
    """(whether a call is forced, the function named by tool_choice or None)."""
    choice = getattr(body, "tool_choice", None)
    if choice == "required":
        return True, None
    if hasattr(choice, "function"):
        return True, choice.function.name
    return False, None


def render(tok, body, settings: ServerChatSettings) -> tuple[str, OutputSpec]:
    """The prompt text and how its answers are read; APIError (400) for what cannot be rendered."""
    template = settings.chat_template or tok.chat_template
    if template is None:
        raise APIError(400, "this model has no chat template; send a raw prompt to "
                            "/v1/completions instead", "messages")
    tools = active_tools(body)
    kwargs = template_kwargs(settings, body)
    try:
        messages = message_dicts(body.messages)
        if "tools" not in template_variables(template):
            messages = with_tools_in_prompt(messages, tools)
        elif tools:
            kwargs["tools"] = tools
        text = render_chat_template(template, messages, add_generation_prompt=True,
                                    bos_token=tok.bos_token, eos_token=tok.eos_token, **kwargs)
    except (ValueError, RequestError) as e:  # the template's own raise_exception included
        raise APIError(400, str(e), "messages") from None
    spec = OutputSpec()
    reasoning = settings.reasoning_parser
    if reasoning == "think" or (reasoning == "auto" and uses_thinking(template)):
        spec.reasoning = True
        spec.starts_in_thinking = ends_in_thinking(text)
    if tools:
        spec.tool_format = format_for(settings.tool_call_parser, template)
        spec.tools = {t["function"]["name"]: t["function"] for t in tools}
        forced, name = forced_function(body)
        spec.single_call = name is not None or not getattr(body, "parallel_tool_calls", True)
        if forced:
            spec.prefix = forced_prefix(spec, name)
    return text + spec.prefix, spec


def forced_prefix(spec: OutputSpec, name: str | None) -> str:
    """The opening of a call the prompt ends with; a thinking left open is closed first."""
    prefix = spec.tool_format.forced_prefix(name)
    if spec.starts_in_thinking:
        prefix = CLOSE + "\n\n" + prefix
    return prefix
