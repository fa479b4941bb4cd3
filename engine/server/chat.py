"""A chat request's messages (and tools) rendered through the model's chat template."""

from __future__ import annotations

from typing import Any

from engine.errors import InvalidRequestError
from engine.server.protocol import ChatTemplateFields


def render_chat(tokenizer: Any, body: ChatTemplateFields, tools: list[dict] | None = None) -> str:
    """The prompt text, rendered as transformers' apply_chat_template does for the same arguments.

    `tools` are OpenAI function tools, which templates that know tools (Qwen,
    Llama 3.1, Mistral, Hermes) write into the system prompt.
    """
    template = body.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise InvalidRequestError("this model has no chat template; use completions or send chat_template",
                                  param="messages")
    kwargs = dict(body.chat_template_kwargs or {})
    try:
        return tokenizer.apply_chat_template(
            [message.as_template_input() for message in body.messages],
            tools=tools or None,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            **kwargs,
        )
    except InvalidRequestError:
        raise
    except Exception as error:  # jinja and transformers raise many types for messages a template rejects
        raise InvalidRequestError(f"the chat template rejected the messages: {error}", param="messages") from None
