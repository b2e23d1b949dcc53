"""The explorer's JSON answers, defined once: :mod:`hhrlhf.explorer.query` builds these models,
:mod:`hhrlhf.explorer.app` declares them as its responses (so they document the API in
``/openapi.json``) and its pages read them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Segments = list[tuple[str, bool]]
SnippetField = Literal["context", "chosen", "rejected", "transcript", "task_description"]


class ErrorOut(BaseModel):
    detail: str = Field(description="What is wrong, in words")


class SearchHit(BaseModel):
    id: int = Field(description="Row id in this database (changes when its file is re-indexed)")
    kind: Literal["pairs", "redteam"]
    source: str = Field(description="The indexed file, e.g. harmless-base/test")
    subset: str
    split: str | None
    index: int = Field(description="0-based row number in its file")
    url: str = Field(description="Permalink of the row's page")
    api_url: str
    num_turns: int
    flags: list[str] = Field(description="Audit flags of a pair (per-row and cross-row)")
    snippet: Segments = Field(
        description="The best-matching passage as [text, is_match] segments")
    snippet_field: SnippetField = Field(
        description="Where the snippet comes from: a pair's context (the turns before the "
                    "final response), its chosen or its rejected response; a red-team "
                    "attempt's transcript or task description")
    model_type: str | None = None
    num_params: str | None = None
    rating: float | None = None
    min_harmlessness_score: float | None = None
    is_upworker: bool | None = None


class SearchOut(BaseModel):
    query: str
    fts_query: str | None = Field(description="The FTS5 query the text became")
    total: int = Field(description="Rows matching the query and filters")
    page: int
    per_page: int
    pages: int = Field(description="Pages of per_page results (at least 1)")
    first: int = Field(description="1-based number of this page's first result (0: none)")
    last: int = Field(description="1-based number of this page's last result (0: none)")
    sort: str
    ranked: bool = Field(description="Whether the results are in relevance order")
    note: str | None
    took_ms: float
    results: list[SearchHit]


class TurnOut(BaseModel):
    role: Literal["human", "assistant"]
    text: str


class FlagOut(BaseModel):
    name: str
    description: str


class DiffOut(BaseModel):
    chosen: Segments = Field(description="[text, not in the other side] segments")
    rejected: Segments


class PairOut(BaseModel):
    kind: Literal["pairs"]
    source: str
    subset: str
    split: str | None
    index: int
    line: int
    url: str
    num_turns: int
    flags: list[FlagOut]
    context: list[TurnOut] = Field(description="The turns before the final response")
    rejected_context: list[TurnOut] | None = Field(
        description="The rejected dialogue's own context, when it differs (context_mismatch)")
    chosen: str
    rejected: str
    diff: DiffOut
    prev: str | None
    next: str | None


class RedTeamOut(BaseModel):
    kind: Literal["redteam"]
    source: str
    index: int
    line: int
    url: str
    transcript: list[TurnOut]
    task_description: str
    model_type: str
    num_params: str
    rating: float
    min_harmlessness_score_transcript: float
    task_description_harmlessness_score: float | None
    red_team_member_id: int | str | None
    is_upworker: bool
    tags: list[str] | None
    prev: str | None
    next: str | None


class SourceOut(BaseModel):
    name: str = Field(description="How the file is named here: subset/split, or a file name")
    subset: str
    split: str | None
    kind: Literal["pairs", "redteam"]
    rows: int
    sha256: str
    size: int = Field(description="Bytes")
    indexed_at: str


class FlagCountOut(BaseModel):
    name: str
    description: str
    cross_row: bool = Field(description="Set by comparing rows (duplicates, overlaps)")
    rows: int


class CellOut(BaseModel):
    model_type: str
    num_params: str
    attacks: int
    mean_rating: float
    success_share: float = Field(description="Share of attacks rated 3 or more")
    mean_min_harmlessness_score: float


class OverviewOut(BaseModel):
    database: str = Field(description="The database's file name")
    built_at: str | None
    sources: list[SourceOut]
    pairs: int
    redteam_attempts: int
    flagged_pairs: int
    flags: list[FlagCountOut]
    redteam_cells: list[CellOut]
    stats_plot: str | None = Field(description="URL of the statistics figure, if any")


class TagCountOut(BaseModel):
    tag: str
    rows: int


class SortOut(BaseModel):
    name: str
    description: str


class FacetsOut(BaseModel):
    kinds: list[str]
    subsets: list[str]
    splits: list[str]
    flags: list[FlagOut]
    model_types: list[str]
    sizes: list[str]
    tags: list[TagCountOut]
    workers: list[str]
    sorts: list[SortOut]
