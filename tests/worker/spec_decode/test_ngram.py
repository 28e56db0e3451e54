"""Prompt lookup proposes what followed the longest earlier match of the last tokens, from an index kept up to date."""

from __future__ import annotations

from worker.spec_decode.ngram import NgramIndex


def test_proposes_what_followed_the_longest_match() -> None:
    index = NgramIndex(2, 4)
    # "5 6" follows "1 2" at the start; "9 1 2" later is followed by "7": the 3-gram "9 1 2" wins over the 2-gram
    tokens = [1, 2, 5, 6, 9, 1, 2, 7, 8, 4, 9, 1, 2]
    assert index.propose(tokens, 3) == [7, 8, 4]
    assert index.propose([*tokens[:-3], 3, 1, 2], 2) == [5, 6]  # only the 2-gram "1 2" matches: its first occurrence


def test_proposals_stop_at_the_end_of_what_is_known_and_at_k() -> None:
    index = NgramIndex(2, 3)
    assert index.propose([4, 5, 6, 4, 5], 4) == [6, 4, 5]  # what followed runs into the suffix itself
    assert index.propose([4, 5, 6, 4, 5, 6, 4, 5], 2) == [6, 4]


def test_no_match_and_too_short_propose_nothing() -> None:
    index = NgramIndex(2, 4)
    assert index.propose([1], 4) == []
    assert index.propose([1, 2, 3, 4], 4) == []
    assert NgramIndex(3, 3).propose([1, 2, 9, 1, 2], 4) == []  # "1 2" matches, but 3 tokens are asked for


def test_the_index_follows_appended_tokens() -> None:
    index = NgramIndex(2, 2)
    tokens = [1, 2, 3]
    assert index.propose(tokens, 2) == []
    tokens += [1, 2]
    assert index.propose(tokens, 2) == [3, 1]
    tokens += [8, 1, 2]
    assert index.propose(tokens, 1) == [3]  # the first occurrence stays the one proposed from
