"""vLLM's tokenizer endpoints: POST /tokenize, POST /detokenize, GET /tokenizer_info.

Clients use them to count tokens and to build token-id prompts with the
server's own tokenizer and chat template; the rendering is the one chat
completions use, so the counts agree with a chat request's usage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from engine.server.chat import render_chat
from engine.server.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest

if TYPE_CHECKING:
    from engine.server.app import ServerState

# Tokenizer settings /tokenizer_info reports (JSON-representable entries of the tokenizer's config).
_INFO_SCALARS = (str, int, float, bool, type(None))
_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def add_tokenizer_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/tokenize")
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> dict:
        state.check_model(body.model)
        tokenizer = state.tokenizer
        if isinstance(body, TokenizeChatRequest):
            body.check_template_flags()
            text = render_chat(tokenizer, body)
        else:
            text = body.prompt
        token_ids = tokenizer(text, add_special_tokens=body.add_special_tokens)["input_ids"]
        response: dict[str, Any] = {"count": len(token_ids), "max_model_len": state.engine.limits.max_model_len,
                                    "tokens": token_ids}
        if body.return_token_strs:
            response["token_strs"] = tokenizer.convert_ids_to_tokens(token_ids)
        return response

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        state.check_model(body.model)
        return {"prompt": state.prompt_checker.text(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        tokenizer = state.tokenizer
        info = {key: value for key, value in tokenizer.init_kwargs.items() if isinstance(value, _INFO_SCALARS)}
        info.update({name: getattr(tokenizer, name, None) for name in _SPECIAL_TOKENS})
        info.update(tokenizer_class=type(tokenizer).__name__, chat_template=getattr(tokenizer, "chat_template", None),
                    vocab_size=len(tokenizer))
        return info
