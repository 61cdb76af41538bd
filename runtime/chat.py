"""The file's chat template (Jinja, as transformers renders it) and a multi-turn conversation."""
from __future__ import annotations

from dataclasses import dataclass, field


def render_chat(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True) -> str:
    """Render `messages` ([{"role", "content"}]) with a Hugging Face chat template."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                            add_generation_prompt=add_generation_prompt)


@dataclass
class Conversation:
    """Messages so far; the model's KV cache keeps the rendered prefix, so each turn prefills only
    the new user message."""

    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    def all(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages
