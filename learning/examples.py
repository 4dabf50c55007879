"""The unit of training data, shared by the worker, the protocol and the trainer (torch-free)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Example(BaseModel):
    """One prompt → response pair, plus what evaluation needs to judge it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Stable identifier, e.g. the experience id or 'anchor:12'.")
    prompt: str
    response: str
    system: str | None = None
    key_answer: str | None = Field(
        default=None,
        description="Text a correct answer must contain; the whole response when absent.",
    )
    paraphrases: list[str] = Field(default_factory=list, description="Other wordings of the prompt.")
    loss: float | None = Field(default=None, description="Last measured loss, for prioritised replay.")
