"""A chat request's messages (and tools) rendered through the model's chat template."""

from __future__ import annotations

from typing import Any

from engine.errors import InvalidRequestError
from engine.server.protocol import ChatTemplateFields


def render_chat(tokenizer: Any, body: ChatTemplateFields) -> str:
    """The prompt text, rendered as transformers' apply_chat_template does for the same arguments.

    The request's tools (OpenAI function tools) go to the template, which writes
    them into the prompt when it knows tools (Qwen, Llama 3.1, Mistral, Hermes).
    """
    template = body.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise InvalidRequestError("this model has no chat template; use completions or send chat_template",
                                  param="messages")
    kwargs = dict(body.chat_template_kwargs or {})
    try:
        return tokenizer.apply_chat_template(
            [message.as_template_input() for message in body.messages],
            tools=body.tool_definitions,
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
