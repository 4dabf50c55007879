"""The model host's HTTP contract (OpenAI-compatible chat completions, models, health), shared by host and client.

Torch-free: the MCP server imports it through `host.client`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 4  # as OpenAI's API
MAX_TOKENS = 4096


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. `name`

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[TextPart], Field(description="Text, or a list of text parts (joined).")]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """What the host accepts. Unknown fields are ignored, as OpenAI-compatible servers do; fields whose
    non-default value we cannot honour (n > 1, tools, logprobs) are refused rather than silently dropped."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="The kernel name.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="0: greedy. Default 1, as OpenAI.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64, description="The same seed repeats a sample.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 sequences; output ends before them.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per request.")
    logprobs: bool | None = Field(default=None, description="Not supported: leave unset or false.")
    tools: list[Any] | None = Field(default=None, description="Not supported: leave unset or empty.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence cannot be empty")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> ChatRequest:
        if self.logprobs:
            raise ValueError("logprobs are not supported by the engrain host; leave logprobs unset")
        if self.tools:
            raise ValueError("tool calls are not supported by the engrain host; send no tools")
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be the assistant's: there is nothing to answer")
        return self

    @property
    def asked(self) -> str:
        """What the conversation asks, for scope routing: every message but the assistant's."""
        return "\n".join(m.text for m in self.messages if m.role != "assistant")

    @property
    def token_budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 128

    @property
    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


FinishReason = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    engrain_version: int | None = Field(
        description="The kernel's adapter version that answered; None: the base "
        "(nothing deployed, or the prompt names nothing the kernel was taught)."
    )


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatChunk(BaseModel):
    """One server-sent event of a streamed completion (`data: {...}`), ended by `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    engrain_version: int | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "engrain"
    engrain_version: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "unloaded", "loading", "failed"]
    home_id: str = Field(description="Which ENGRAIN_HOME this host serves; clients refuse another home's host.")
    backend: str = Field(description="transformers or llama.cpp.")
    base_model: str
    kernels: dict[str, int | None] = Field(default_factory=dict, description="Resident kernels and their versions.")
    pid: int
    last_deploy_ms: float | None = Field(default=None, description="How long the last adapter load or swap took.")
    training_run: str | None = Field(default=None, description="The run whose training lease keeps it unloaded.")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape: every non-200 answer of the host is one."""

    error: ErrorDetail
