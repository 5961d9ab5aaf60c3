"""Prompts of several kinds built from text that ships with Python (stdlib docstrings and sources,
pydoc topics) plus generated arithmetic, for training MTP heads and for benchmarks.

Every prompt falls in the "train" or the "eval" split by a hash of the item it was built from (a
function, a topic, a module, a math problem), so held-out prompts never share a source with training
prompts. The set depends on the Python version's stdlib; it is deterministic for a given version.
"""

from __future__ import annotations

import importlib
import inspect
import random
import zlib
from dataclasses import dataclass, field

KINDS = ("code", "chat", "math", "json")
MAX_TOKENS = {"code": 192, "chat": 160, "math": 128, "json": 128}
EVAL_SHARE = 8  # one source item in EVAL_SHARE goes to the held-out split

# pure-Python stdlib modules whose import has no side effects and whose functions carry docstrings
MODULES = (
    "base64", "bisect", "calendar", "colorsys", "copy", "csv", "dataclasses", "datetime", "difflib",
    "email.utils", "enum", "fnmatch", "fractions", "functools", "glob", "gzip", "heapq", "html",
    "inspect", "ipaddress", "json", "keyword", "linecache", "locale", "logging", "mimetypes",
    "ntpath", "operator", "optparse", "os", "pathlib", "pickle", "platform", "posixpath", "pprint",
    "queue", "quopri", "random", "re", "secrets", "shlex", "shutil", "statistics", "string",
    "struct", "tarfile", "tempfile", "textwrap", "threading", "tokenize", "traceback", "types",
    "typing", "urllib.parse", "uuid", "warnings", "weakref", "zipfile",
)


@dataclass(frozen=True)
class Prompt:
    kind: str
    messages: list = field(hash=False)
    max_tokens: int = 128

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


def _split_of(key: str) -> str:
    return "eval" if zlib.crc32(key.encode()) % EVAL_SHARE == 0 else "train"


def _summary(doc: str | None) -> str | None:
    """First sentence of a docstring, or None when it is missing or unusable."""
    if not doc:
        return None
    first = " ".join(doc.strip().split("\n\n")[0].split())
    first = first.split(". ")[0].rstrip(".")
    if not 12 <= len(first) <= 160 or first.startswith(("Deprecated", "Internal", "Alias")):
        return None
    return first[0].lower() + first[1:]


def _functions() -> list[tuple[str, str, str, str, str]]:
    """(key, module, name, signature, summary, source) for public pure-Python stdlib functions."""
    items = []
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not inspect.isfunction(obj):
                continue
            if obj.__module__ != module.__name__:
                continue
            summary = _summary(obj.__doc__)
            if summary is None:
                continue
            try:
                signature = str(inspect.signature(obj))
                source = inspect.getsource(obj)
            except (TypeError, ValueError, OSError):
                continue
            items.append((f"{module_name}.{name}", module_name, name, signature, summary, source))
    return items


def _modules() -> list[tuple[str, str]]:
    out = []
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        summary = _summary(module.__doc__)
        if summary:
            out.append((module_name, summary))
    return out


def _code_prompts(functions) -> list[tuple[str, str]]:
    out = []
    for key, module, name, signature, summary, source in functions:
        write = f"Write a Python function `{name}{signature}` that does the following: {summary}."
        out.append((key, write))
        sentence = summary[0].upper() + summary[1:]
        complete = (f"Complete this Python function:\n\n```python\ndef {name}{signature}:\n"
                    f'    """{sentence}."""\n```')
        out.append((key, complete))
        if len(source.splitlines()) <= 24:
            rewrite = (f"Rewrite this function from the `{module}` module so it is shorter and "
                       f"easier to read:\n\n```python\n{source.rstrip()}\n```")
            out.append((key, rewrite))
    return out


def _chat_prompts(functions) -> list[tuple[str, str]]:
    import pydoc_data.topics

    out = []
    for topic in sorted(pydoc_data.topics.topics):
        words = topic.replace("-", " ")
        key = f"topic:{topic}"
        out.append((key, f"Explain {words} in Python to a beginner, with a short example."))
        out.append((key, f"What should I know about {words} in Python? Keep it brief."))
        out.append((key, f"I keep getting confused by {words} in Python. "
                         "Can you help me understand it?"))
    for module, summary in _modules():
        question = f"What is the Python `{module}` module for, and when would I use it?"
        out.append((f"module:{module}", question))
    for i, (key, module, name, signature, summary, source) in enumerate(functions):
        if i % 2 == 0:
            question = f"How do I use `{module}.{name}` in Python? What does it return?"
            out.append((f"ask:{key}", question))
    return out


def _json_prompts(functions) -> list[tuple[str, str]]:
    out = []
    for module, summary in _modules():
        text = (f'Describe the Python module `{module}` as a JSON object with the keys "name", '
                '"purpose" and "common_functions" (a list of strings). Output only the JSON.')
        out.append((f"json-module:{module}", text))
    for i, (key, module, name, signature, summary, source) in enumerate(functions):
        if i % 2 == 0:
            text = (f"Return a JSON object describing the function `{module}.{name}{signature}` "
                    'with the keys "name", "module", "arguments" (a list of objects with "name" '
                    'and "default") and "summary". Output only the JSON.')
            out.append((f"json:{key}", text))
        else:
            text = (f"Give a numbered list of three situations where `{module}.{name}` is useful, "
                    "one line each.")
            out.append((f"list:{key}", text))
    return out


def _math_prompts(count: int = 1600, seed: int = 1234) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        a = rng.randint(2, 99)
        b = rng.randint(2, 99)
        c = rng.randint(2, 30)
        style = i % 6
        if style == 0:
            text = f"What is {a} + {b} * {c}? Show your steps."
        elif style == 1:
            text = f"Solve for x: {c}x + {a} = {a + c * b}. Explain each step."
        elif style == 2:
            text = (f"A train travels {a * c} km in {c} hours. "
                    "What is its average speed in km per hour?")
        elif style == 3:
            text = f"What is {c * 5}% of {a * 20}? Explain how you got the answer."
        elif style == 4:
            text = (f"Sara has {a} apples. She gives away {min(a - 1, b)} and then buys {c} more. "
                    "How many does she have?")
        else:
            text = f"Is {a * b + 1} a prime number? Reason step by step."
        out.append((f"math:{text}", text))
    return out


def _candidates(kind: str, functions) -> list[tuple[str, str]]:
    if kind == "code":
        return _code_prompts(functions)
    if kind == "chat":
        return _chat_prompts(functions)
    if kind == "json":
        return _json_prompts(functions)
    if kind == "math":
        return _math_prompts()
    raise ValueError(f"unknown prompt kind {kind!r}; choose from {', '.join(KINDS)}")


def prompt_set(
    split: str = "eval", kinds=KINDS, per_kind: int | None = None, seed: int = 0
) -> list[Prompt]:
    """Prompts of ``split`` ("train" or "eval"),
    ``per_kind`` of each kind (all when None), in a fixed order."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    functions = _functions()
    prompts = []
    for kind in kinds:
        chosen = [text for key, text in _candidates(kind, functions) if _split_of(key) == split]
        random.Random(f"{seed}:{kind}").shuffle(chosen)
        if per_kind is not None:
            chosen = chosen[:per_kind]
        for text in chosen:
            prompts.append(Prompt(kind, [{"role": "user", "content": text}], MAX_TOKENS[kind]))
    return prompts
