"""The request bodies of the OpenAI-compatible routes (pydantic; unknown fields refused, never ignored).

Only what moec implements is accepted: an OpenAI field that would change the output and that
moec does not do (``presence_penalty``, ``logit_bias``, ``best_of``, ``suffix``, ...) is an
unknown field, a 422, rather than a request answered as if it were not there.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOKENS = 4096  # as POST /generate's max_new_tokens
MAX_LOGPROBS = 20
MAX_PROMPTS = 64  # prompts in one batch request
MAX_CHOICES = 16  # n
MAX_STOPS = 16

TokenId = Annotated[int, Field(strict=True, ge=0)]
Text = Annotated[str, Field(min_length=1)]
# emptiness is checked after the union picks its member (CompletionRequest._prompts), for one plain message
Prompt = Union[str, Annotated[list[str], Field(max_length=MAX_PROMPTS)], list[TokenId],
               Annotated[list[list[TokenId]], Field(max_length=MAX_PROMPTS)]]
Stop = Union[Text, Annotated[list[Text], Field(max_length=MAX_STOPS)], None]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False  # a last chunk with the usage counts (and no choices)


class SamplingFields(Strict):
    """The fields both completion routes share."""

    model: str = Field(description="The served model's id (GET /v1/models).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="An extension: sample among the k most likely tokens; 0: all.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Choice i samples with seed + i; none: a random seed.")
    stop: Stop = Field(None, description="Strings that end a choice; the text stops before them.")
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int = Field(16, ge=0, le=MAX_TOKENS)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Top alternatives per position (0: the token's own).")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt):
        if not prompt or any(not element for element in prompt if isinstance(element, (str, list))):
            raise ValueError("the prompt is empty (or one of its prompts is)")
        return prompt

    @model_validator(mode="after")
    def _zero_tokens_need_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 returns nothing without echo: true")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One prompt per batch element: a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        return [self.prompt] if isinstance(self.prompt[0], int) else list(self.prompt)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, Annotated[list[TextPart], Field(min_length=1)]]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="None: until the model's window.")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="The newer name of max_tokens.")

    @model_validator(mode="after")
    def _one_limit(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(Strict):
    prompt: str | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    add_special_tokens: bool = False  # an HF tokenizer's post-processor (BOS, ...); byte and id codecs have none
    model: str | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(Strict):
    tokens: list[TokenId]
    model: str | None = None
