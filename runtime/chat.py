"""The file's chat template (Jinja, as transformers renders it) and a multi-turn conversation."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from qformat.errors import QbinError


MAX_RENDERED = 1 << 20  # characters a product or a rendered template may reach (templates come with files)
# jinja2's compiler takes superlinear time in the nesting ({{ x ++++...+ y }}: 200 levels, 2.6 s;
# 90 levels, 0.5 s on a loaded machine: both found by tests/fuzz/fuzz.py); the templates models
# ship nest 7 to 11 levels (tests/fuzz/seeds.py's, SmolLM2's)
MAX_DEPTH = 50


def _depth(node) -> int:
    """Levels of the template's syntax tree (iteratively: the tree may be deeper than the stack)."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        stack.extend((child, d + 1) for child in node.iter_child_nodes())
    return deepest


class _Refused(Exception):
    """The template refused, or ran past a sandbox limit: its message is the whole problem."""


def _raise_exception(message):
    raise _Refused(f"the chat template refuses these messages: {message}")


@functools.cache
def _sandbox():
    """The one sandboxed environment every render uses (jinja2 imported on first use)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            # "a" * 10**9 or 9**9**9 would hold the process for minutes or gigabytes
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise _Refused(f"the chat template's exponent {right} is past the sandbox's limit of 64")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDERED:
                        raise _Refused(f"the chat template's product of {len(seq) * n} items is past the "
                                       f"sandbox's limit of {MAX_RENDERED}")
            return super().call_binop(context, operator, left, right)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env


def render_chat(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, source: object = "chat template") -> str:
    """Render `messages` ([{"role", "content"}]) with a Hugging Face chat template, in jinja2's
    sandbox. A template that does not parse, raises (raise_exception) or runs past the sandbox's
    limits (MAX_DEPTH, MAX_RENDERED, exponents over 64) gives one QbinError naming `source` (the
    qbin's path)."""
    env = _sandbox()
    try:
        tree = env.parse(template)
        if _depth(tree) > MAX_DEPTH:
            raise _Refused(f"the chat template nests deeper than the sandbox's {MAX_DEPTH} levels")
        text = env.from_string(tree).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                            add_generation_prompt=add_generation_prompt)
    except _Refused as e:
        raise QbinError(source, str(e)) from None
    except Exception as e:  # jinja2's errors, and Python's from inside the template (RecursionError too)
        raise QbinError(source, f"the chat template fails ({type(e).__name__}: {str(e)[:200]}); "
                                "fix the file's chat_template or pass a plain prompt") from None
    if len(text) > MAX_RENDERED:
        raise QbinError(source, f"the chat template rendered {len(text)} characters, past the sandbox's limit "
                                f"of {MAX_RENDERED}")
    return text


@dataclass
class Conversation:
    """Messages so far; the model's KV cache keeps the rendered prefix, so each turn prefills only
    the new user message."""

    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    def all(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages
