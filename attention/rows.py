"""The batch-row layout: which row of a UNet call plays which role.

The sampler hands the model ``len(cond_or_uncond)`` equal chunks (one per CFG
branch, 0 = positive, 1 = negative, in any order and possibly in separate
calls). Controls may append extra rows (a reference stream, a subject stream,
...). Attention code reads roles from this layout, never from fixed positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROLE_COND = "cond"
ROLE_UNCOND = "uncond"
ROLE_REFERENCE = "reference"
ROLE_SUBJECT = "subject"
ROLE_CONDITION = "condition"

SAMPLER_ROLES = (ROLE_COND, ROLE_UNCOND)
# ComfyUI's cond_or_uncond codes.
_BRANCH_ROLE = {0: ROLE_COND, 1: ROLE_UNCOND}

# Which CFG branch's image prompt a row takes (``Row.image_prompt``): the positive one, the
# negative one (what the negative branch gets depends on the guidance policy), or none.
PROMPT_POSITIVE = "positive"
PROMPT_NEGATIVE = "negative"
_BRANCH_PROMPT = {ROLE_COND: PROMPT_POSITIVE, ROLE_UNCOND: PROMPT_NEGATIVE}


@dataclass(frozen=True)
class Row:
    """One batch row.

    role:   what the row is (cond, uncond, reference, ...).
    item:   index of the latent batch item the row belongs to (sampler rows),
            or the index inside its stream (extra rows).
    source: for extra rows, the name of the stream that appended it, so two
            controls with streams of the same role stay apart.
    image_prompt: which image prompt the row sees (``PROMPT_POSITIVE``, ``PROMPT_NEGATIVE``)
            or None. Sampler rows see their CFG branch's; an extra row sees what the
            control that appends it says (a generated stream that should look like the
            target: positive; an inverted reference: none). Image-prompt controls read
            this, never a list of roles, so a new kind of row needs no change elsewhere.
    """

    role: str
    item: int = 0
    source: str | None = None
    image_prompt: str | None = None

    @property
    def is_sampler_row(self) -> bool:
        return self.source is None


@dataclass(frozen=True)
class RowLayout:
    rows: tuple[Row, ...]

    @classmethod
    def from_cond_or_uncond(cls, cond_or_uncond: list[int], batch_size: int) -> "RowLayout":
        """Layout of a sampler call: equal chunks, one per entry of ``cond_or_uncond``."""
        chunks = len(cond_or_uncond)
        if chunks == 0 or batch_size % chunks != 0:
            raise ValueError(
                f"row layout: expected a batch divisible into {chunks} CFG chunks, got {batch_size} rows"
            )
        per_chunk = batch_size // chunks
        rows = []
        for code in cond_or_uncond:
            role = _BRANCH_ROLE.get(int(code))
            if role is None:
                raise ValueError(f"row layout: expected cond_or_uncond codes 0 or 1, got {code}")
            rows.extend(Row(role, item, image_prompt=_BRANCH_PROMPT[role]) for item in range(per_chunk))
        return cls(tuple(rows))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_sampler_rows(self) -> int:
        return sum(1 for row in self.rows if row.is_sampler_row)

    def with_extra(self, extra: list[Row] | tuple[Row, ...]) -> "RowLayout":
        for row in extra:
            if row.is_sampler_row:
                raise ValueError(f"row layout: extra rows need a source, got {row}")
        return RowLayout(self.rows + tuple(extra))

    def indices(self, role: str, source: str | None = None) -> list[int]:
        """Row indices with this role (and, for extra rows, this source)."""
        return [
            i
            for i, row in enumerate(self.rows)
            if row.role == role and (source is None or row.source == source)
        ]

    def has(self, role: str, source: str | None = None) -> bool:
        return bool(self.indices(role, source))

    def index_tensor(self, role: str, device: torch.device, source: str | None = None) -> torch.Tensor:
        return torch.tensor(self.indices(role, source), dtype=torch.long, device=device)

    def image_prompt_rows(self, branch: str) -> list[int]:
        """Row indices that see ``branch``'s image prompt (``Row.image_prompt``)."""
        return [i for i, row in enumerate(self.rows) if row.image_prompt == branch]

    def items(self, role: str) -> list[int]:
        """Batch-item index of every row of ``role``, in row order."""
        return [row.item for row in self.rows if row.role == role]


# ---------------------------------------------------------------------------
# Taking and writing batch rows of q/k/v or outputs without needless copies


def row_runs(rows) -> list[tuple[int, int, int]]:
    """``rows`` (batch indices, in order) as runs of consecutive indices: (position in ``rows``,
    first index, count). [0, 1, 3] -> [(0, 0, 2), (2, 3, 1)]."""
    runs: list[tuple[int, int, int]] = []
    for position, row in enumerate(rows):
        row = int(row)
        if runs and runs[-1][1] + runs[-1][2] == row:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((position, row, 1))
    return runs


def take_rows(x: torch.Tensor, rows) -> torch.Tensor:
    """``x``'s batch rows ``rows`` in that order: a view when they are consecutive (the usual
    case: a CFG branch, a stream's rows), else a gathered copy. Never write into the result."""
    rows = list(rows)
    runs = row_runs(rows)
    if len(runs) == 1:
        return x.narrow(0, runs[0][1], runs[0][2])
    return x.index_select(0, torch.tensor(rows, dtype=torch.long, device=x.device))


def put_rows(out: torch.Tensor, rows, values: torch.Tensor, part=None) -> None:
    """``out[rows] = values`` in place, run by run (no gather). ``part``: a function giving the
    part of ``out``'s row block that ``values`` holds (a DiT's image tokens); None: whole rows."""
    for position, first, count in row_runs(rows):
        target = out.narrow(0, first, count)
        (target if part is None else part(target)).copy_(values.narrow(0, position, count))
