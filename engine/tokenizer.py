"""The tokenizer side of a front end: prompt tokenization and chat templates.

Lives apart from the engine core so that the API process can tokenize and
render chat templates without loading a model (engine.tokenizer_loader loads it).
"""

from __future__ import annotations

from engine.errors import InvalidRequestError


def tokenize_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's special tokens unless the text already has its BOS.

    Chat templates write the BOS token into the text; adding it again would
    give the model a doubled BOS it never saw in training.
    """
    bos = tokenizer.bos_token
    add_special_tokens = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


class ChatTemplate:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def render(self, messages: list[dict]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; use completions instead", param="messages")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # jinja raises for messages the template rejects
            raise InvalidRequestError(f"the chat template rejected the messages: {error}", param="messages") from None
