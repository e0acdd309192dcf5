"""The methods table of ``weightweaving methods --markdown`` and the README, made from the registry."""

from __future__ import annotations

from .base import Method
from .registry import get_method, list_methods

HEADER = (
    "| method | what it does | data-free | reported (CLIP) | reference | λ: kind, default, paper range | scope |\n"
    "|---|---|---|---|---|---|---|"
)


def _lam_cell(method: Method) -> str:
    if method.default_lam is None:
        return f"{method.lam_kind.value}, —"
    ranges = list(dict.fromkeys(method.paper_lam_ranges.values()))  # one entry when all setups agree
    text = " / ".join(
        f"{a}–{b}" for a, b in (ranges if len(ranges) == 1 else method.paper_lam_ranges.values())
    )
    return f"{method.lam_kind.value}, {method.default_lam}, {text or '—'}"


def methods_table() -> str:
    """One Markdown row per registered method, from its declared metadata."""
    rows = [HEADER]
    for name in list_methods():
        method = get_method(name)
        cells = [
            f"`{name}`",
            method.summary,
            "yes" if method.data_free else "no",
            method.reported or "—",
            method.reference or "—",
            _lam_cell(method),
            method.scope.value,
        ]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)
