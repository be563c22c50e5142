"""Comparing state dicts: which keys a set of weights lacks, adds or has in another shape."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


def state_dict_mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Any]) -> str:
    """Missing, unexpected and wrongly shaped keys of ``found`` against ``expected``; '' if they match."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(
        k for k in set(expected) & set(found) if getattr(found[k], "shape", None) != getattr(expected[k], "shape", None)
    )
    return "; ".join(
        f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    )
