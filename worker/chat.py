"""Chat messages into the prompt the engine tokenizes: the model's own chat template (or the one
the config sets in its place), with the assistant's turn opened, then any text the reply already
starts with (a resumed stream's text so far).

Rendering goes through `tokenizer.apply_chat_template`, so a model's template behaves here as it
does everywhere else in the Hugging Face world.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from tierserve.domain.config import ModelConfig
from tierserve.domain.errors import InvalidRequest, StartupError, Unsupported
from tierserve.domain.requests import GenerationParams

# What the start-up check renders: one user turn, which every chat template accepts.
SAMPLE_CONVERSATION = ({"role": "user", "content": "Hello?"},)


def configured_template(model: ModelConfig) -> str | None:
    """The template the config sets in place of the tokenizer's (inline or from its file); None: none."""
    if model.chat_template:
        return model.chat_template
    if model.chat_template_file:
        path = Path(model.chat_template_file).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except OSError as error:
            raise StartupError(f"[model] chat_template_file: cannot read {path}: {error.strerror}") from None
    return None


def install_chat_template(tokenizer: Any, model: ModelConfig) -> str:
    """Put the configured template (if any) on the tokenizer, where `render_prompt` finds it, and
    check that it renders; a description of what chat requests will get, for the log."""
    override = configured_template(model)
    if override is not None:
        tokenizer.chat_template = override
    if not tokenizer.chat_template:
        return "none: chat requests answer FAILED_PRECONDITION (set [model] chat_template to serve them)"
    try:
        tokenizer.apply_chat_template(list(SAMPLE_CONVERSATION), add_generation_prompt=True, tokenize=False)
    except jinja2.TemplateError as error:
        if override is not None:  # the operator's template: refuse to start rather than fail every chat
            raise StartupError(f"[model] chat template does not render a user message: {error}") from None
        return f"the model's own, which failed on a sample conversation: {error}"
    return "configured in [model]" if override is not None else "the model's own"


def render_prompt(tokenizer: Any, params: GenerationParams, template: str | None = None) -> str:
    """The text the engine tokenizes for `params`: the prompt as it is, or the messages rendered by
    `template` (None: the tokenizer's own, where the worker installed the configured one), with the
    assistant's turn opened; then the response prefix.

    Raises Unsupported when there is no chat template, InvalidRequest when the template refuses the
    messages (e.g. roles that do not alternate)."""
    if not params.messages:
        return params.prompt + params.response_prefix
    if not (template or tokenizer.chat_template):
        raise Unsupported(
            "messages: this model has no chat template; send a prompt, or configure one "
            "([model] chat_template or chat_template_file)"
        )
    _refuse_markup(tokenizer, params)
    conversation = [{"role": m.role, "content": m.content} for m in params.messages]
    try:
        rendered: str = tokenizer.apply_chat_template(
            conversation, chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except jinja2.TemplateError as error:
        raise InvalidRequest("messages", f"the model's chat template refused them: {error}") from None
    return _without_leading_bos(tokenizer, rendered) + params.response_prefix


def _refuse_markup(tokenizer: Any, params: GenerationParams) -> None:
    """The rendered conversation is tokenized with special tokens parsed, so a message holding the
    model's own markup (e.g. "<|im_end|>\n<|im_start|>system") would forge turns: refuse it."""
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    for index, message in enumerate(params.messages):
        found = next((t for t in specials if t in message.content), None)
        if found is not None:
            raise InvalidRequest(
                f"messages[{index}].content",
                f"contains the model's special token {found!r}, which would forge chat markup",
            )


def _without_leading_bos(tokenizer: Any, text: str) -> str:
    """Templates write the BOS token themselves; a tokenizer that also adds one when it encodes (as
    the engine encodes) would double it, so the rendered one goes."""
    bos = tokenizer.bos_token
    if not bos or not text.startswith(bos):
        return text
    adds_bos = tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    return text[len(bos) :] if adds_bos else text
