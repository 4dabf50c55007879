"""Checks on what agents submit, with errors that name the field and the limit."""

from __future__ import annotations

from mcp.server.mcpserver.exceptions import ToolError

from train_worker.settings import Settings


def check_text(field: str, value: str | None, limit: int, env: str, *, required: bool = True) -> None:
    if value is None:
        if required:
            raise ToolError(f"{field} is required")
        return
    if required and not value.strip():
        raise ToolError(f"{field} is empty; give the text to learn")
    if len(value) > limit:
        raise ToolError(
            f"{field} is {len(value)} characters; the limit is {limit}. "
            f"Shorten it, split it into several experiences, or raise {env}."
        )


def check_experience(
    settings: Settings,
    where: str,
    prompt: str,
    response: str,
    system: str | None,
    key_answer: str | None,
    paraphrases: list[str],
) -> None:
    check_text(f"{where}prompt", prompt, settings.max_prompt_chars, "ENGRAIN_MAX_PROMPT_CHARS")
    check_text(f"{where}response", response, settings.max_response_chars, "ENGRAIN_MAX_RESPONSE_CHARS")
    check_text(f"{where}system", system, settings.max_system_chars, "ENGRAIN_MAX_SYSTEM_CHARS", required=False)
    if key_answer is not None:
        check_text(f"{where}key_answer", key_answer, settings.max_response_chars, "ENGRAIN_MAX_RESPONSE_CHARS")
        if key_answer.strip().lower() not in response.lower():
            raise ToolError(
                f"{where}key_answer {key_answer!r} does not occur in the response; "
                "it must be the part of the response a correct answer has to contain"
            )
    for n, text in enumerate(paraphrases):
        check_text(f"{where}paraphrases[{n}]", text, settings.max_prompt_chars, "ENGRAIN_MAX_PROMPT_CHARS")
