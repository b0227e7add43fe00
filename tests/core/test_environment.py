"""The (major, minor) release adapters compare a framework's version by."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlpersist._environment import release


@pytest.mark.parametrize(("version", "expected"), [
    ("3.15.1", (3, 15)),          # Keras
    ("3.16.0.dev2026", (3, 16)),  # a nightly
    ("3.10rc1", (3, 10)),         # a candidate without a patch number
    ("2.13.0+cpu", (2, 13)),      # torch's local label
    ("2.10+cu128", (2, 10)),      # a local label right after the minor number
    ("1.8.dev0", (1, 8)),         # scikit-learn's development version
    ("3.1.0rc1", (3, 1)),         # XGBoost's candidate
    ("4", (4, 0)),
    ("", (0, 0)),
    ("dev", (0, 0)),
])
def test_release_takes_the_leading_digits_of_the_first_two_parts(version: str, expected: tuple[int, int]) -> None:
    assert release(version) == expected


@given(st.integers(0, 10**6), st.integers(0, 10**6),
       st.from_regex(r"(\.[0-9]+)?([a-z+.][a-z0-9+.]*)?", fullmatch=True))
def test_release_reads_any_version_with_a_suffix(major: int, minor: int, suffix: str) -> None:
    assert release(f"{major}.{minor}{suffix}") == (major, minor)
