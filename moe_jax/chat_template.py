"""A checkpoint's chat template (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`),
rendered as Hugging Face does: a sandboxed jinja2 environment, `add_generation_prompt=True`, and the
`bos_token` / `eos_token` of `tokenizer_config.json`."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moe_jax.job_requests import optional, refuse_unknown
from moe_jax.json_files import read_json_object
from moe_jax.tokenizer import Tokenizer


class ChatTemplateError(ValueError):
    """A template that cannot be read, or that fails to render some messages."""


def missing_template(model: str) -> ChatTemplateError:
    """The error of a chat request to a model that has no chat template."""
    return ChatTemplateError(f"model {model} has no chat template (chat_template in tokenizer_config.json, or "
                             f"chat_template.jinja), so it cannot run chat requests")


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


MESSAGE_KEYS = ("role", "content", "name")  # a chat message's fields the template gets (tool calls: none)


def chat_messages(messages, where: str = "messages") -> tuple[dict, ...]:
    """A conversation checked for the template, as OpenAI's messages: a non-empty list of {"role", "content"[,
    "name"]} objects, a content a string or a list of text parts (joined by newlines, as vLLM joins them);
    ValueError naming `where` and the message otherwise (other fields, e.g. tool calls, are refused, not dropped)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"'{where}' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"'{where}[{i}]' must be an object with string 'role' and 'content'")
        refuse_unknown(m, MESSAGE_KEYS, f"{where}[{i}].")
        optional(m, "name", lambda v: isinstance(v, str), "a string", f"{where}[{i}].")
    return tuple({"role": m["role"], "content": _content(m["content"], f"{where}[{i}].content"),
                  **({"name": m["name"]} if m.get("name") is not None else {})} for i, m in enumerate(messages))


def _content(content, where: str) -> str:
    """A message's content as text: a string, or a list of text parts ({"type": "text", "text"}, as OpenAI's SDK
    writes them), joined by newlines as vLLM joins them."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise ValueError(f"'{where}' must be a string or a non-empty list of text parts, got {content!r:.60}")
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"'{where}[{j}]' must be a text part {{\"type\": \"text\", \"text\": ...}} (this "
                             f"model reads text only), got {kind!r}")
    return "\n".join(part["text"] for part in content)


def token_text(v) -> str:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return v.get("content", "") if isinstance(v, dict) else v or ""


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", where: str = "chat template"):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{where}: line {e.lineno}: {e.message}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "ChatTemplate | None":
        """The template of a checkpoint directory; None when it has none (or `path` is a preset name)."""
        path = Path(path)
        config_file, jinja_file = path / "tokenizer_config.json", path / "chat_template.jinja"
        config = read_json_object(config_file, ChatTemplateError) if config_file.is_file() else {}
        source, where = config.get("chat_template"), f"{config_file}: chat_template"
        if isinstance(source, list):  # named templates: [{"name", "template"}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if jinja_file.is_file():
            source, where = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
        if not isinstance(source, str):
            return None
        return cls(source, token_text(config.get("bos_token")), token_text(config.get("eos_token")), where)

    def render(self, messages: Sequence[dict]) -> str:
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=True,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as e:  # the template is the checkpoint's code: any failure is reported, not raised
            raise ChatTemplateError(f"chat template: {e}") from None

    def token_ids(self, messages: Sequence[dict], tokenizer: Tokenizer) -> list[int]:
        """The rendered prompt's tokens, without the tokenizer's special tokens (the template writes them),
        as transformers' apply_chat_template(tokenize=True) gives them."""
        return tokenizer.encode(self.render(messages), add_special_tokens=False)
