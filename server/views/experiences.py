"""Experiences, searchable, each with where it came from and where it went; and the review queue."""

from __future__ import annotations

from pydantic import BaseModel

from server.outputs import ReviewItem, ReviewQueue
from server.state import AppState
from store.models import Experience, ExperienceSource, ExperienceStatus, Interaction

PAGE = 50


class ExperienceRow(BaseModel):
    """One experience and its provenance."""

    experience: Experience
    version: int | None = None  # the version its training run deployed
    query: Interaction | None = None  # the answer this correction or gold example came from
    corrected_by: list[Experience] = []  # later corrections of the same prompt


class ExperiencePage(BaseModel):
    kernel: str
    rows: list[ExperienceRow]
    total: int
    offset: int
    limit: int


async def search(
    state: AppState,
    kernel: str,
    text: str = "",
    source: ExperienceSource | None = None,
    status: ExperienceStatus | None = None,
    offset: int = 0,
    limit: int = PAGE,
) -> ExperiencePage:
    await state.store.kernels.get(kernel)
    found, total = await state.store.experiences.search(kernel, text, source, status, limit, offset)
    versions = {v.run_id: v.version for v in await state.store.versions.for_kernel(kernel) if v.run_id}
    queries = {
        i.id: i for i in await state.store.interactions.with_ids([e.interaction_id for e in found if e.interaction_id])
    }
    corrections = await state.store.experiences.corrections_for(kernel, [e.prompt for e in found])
    rows = [
        ExperienceRow(
            experience=e,
            version=versions.get(e.trained_run_id) if e.trained_run_id else None,
            query=queries.get(e.interaction_id) if e.interaction_id else None,
            corrected_by=[c for c in corrections if c.prompt == e.prompt and c.id > e.id],
        )
        for e in found
    ]
    return ExperiencePage(kernel=kernel, rows=rows, total=total, offset=offset, limit=limit)


async def review_queue(state: AppState, kernel: str, limit: int) -> ReviewQueue:
    """The kernel's worst uncorrected answers; the `review_queue` tool returns exactly this."""
    await state.store.kernels.get(kernel)
    items, total = await state.store.interactions.review(kernel, limit)
    return ReviewQueue(
        kernel=kernel,
        items=[
            ReviewItem(
                query_id=i.id,
                prompt=i.prompt,
                response=i.response,
                rating=i.rating,
                version=i.version,
                created_at=i.created_at,
            )
            for i in items
        ],
        total=total,
    )
