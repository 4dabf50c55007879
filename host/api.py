"""The model host's HTTP contract (OpenAI-compatible chat completions plus health), shared by host and client."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str = Field(description="The kernel name.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float | None = None
    stream: bool = False

    @property
    def token_budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 128


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length"]


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
    engrain_version: int | None = Field(description="The kernel's adapter version that answered; None: the base.")


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
    base_model: str
    kernels: dict[str, int | None] = Field(default_factory=dict, description="Resident kernels and their versions.")
    pid: int
    last_deploy_ms: float | None = Field(default=None, description="How long the last adapter load or swap took.")
