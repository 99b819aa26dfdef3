"""POST /tokenize and POST /detokenize (vLLM's extra endpoints)."""
from __future__ import annotations

from graphserve.entrypoints.openai.errors import OpenAIError
from graphserve.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from graphserve.entrypoints.openai.serving_engine import OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    """Text or chat messages to token ids, and back, with the served model's tokenizer."""

    def create_tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """Token ids of a prompt, or of messages rendered through the chat template."""
        self.check_model(request.model)
        processor = self.engine.input_processor
        if request.messages is not None:
            try:
                text = processor.apply_chat_template(request.messages,
                                                     add_generation_prompt=request.add_generation_prompt)
            except ValueError as e:
                raise OpenAIError(str(e), 400, "messages") from None
            except Exception as e:  # noqa: BLE001 (the template ran on what the client sent: a 400)
                raise OpenAIError(f"the chat template failed on these messages: {type(e).__name__}: {e}", 400,
                                  "messages") from None
            add_special_tokens = bool(request.add_special_tokens)  # the template holds them already
        else:
            text = request.prompt
            add_special_tokens = request.add_special_tokens is not False
        tokens = processor.tokenize(text, add_special_tokens=add_special_tokens)
        token_strs = self.engine.tokenizer.convert_ids_to_tokens(tokens) if request.return_token_strs else None
        return TokenizeResponse(count=len(tokens), max_model_len=self.engine.model_config.max_model_len,
                                tokens=tokens, token_strs=token_strs)

    def create_detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """The text of token ids (out-of-vocabulary ids are a 400)."""
        self.check_model(request.model)
        vocab_size = self.engine.model_config.vocab_size
        bad = next((t for t in request.tokens if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise OpenAIError(f"Token id {bad} is out of vocabulary (vocab_size={vocab_size})", 400, "tokens")
        return DetokenizeResponse(prompt=self.engine.tokenizer.decode(request.tokens))
