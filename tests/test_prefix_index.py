"""The prefix index: which cached sequence a prompt reuses, and what is evicted."""

from __future__ import annotations

from llm_stream.model.prefix_index import BLOCK_TOKENS, PrefixIndex, block_hashes, common_prefix

B = BLOCK_TOKENS


def tokens(start: int, count: int) -> list[int]:
    return list(range(start, start + count))


def index(capacity: int = 10_000) -> PrefixIndex[str]:
    return PrefixIndex(capacity)


def test_block_hashes_name_whole_prefixes_only() -> None:
    a = tokens(0, 3 * B + 5)
    b = [*a[: 2 * B], 999, *a[2 * B + 1 :]]
    assert len(list(block_hashes(a))) == 3  # the last 5 tokens make no full block
    assert list(block_hashes(a))[:2] == list(block_hashes(b))[:2]
    assert list(block_hashes(a))[2] != list(block_hashes(b))[2]
    # A block's hash depends on everything before it, not just its own tokens.
    shifted = [7, *a[1:]]
    assert list(block_hashes(shifted))[1] != list(block_hashes(a))[1]


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


def test_a_prompt_reuses_its_longest_common_prefix_to_the_token() -> None:
    idx = index()
    turn = tokens(0, 50)
    idx.insert(turn, "turn 1")
    # The next turn shares 45 tokens, then differs (the template's text after the answer
    # differs from what the model generated): the match ends mid-block, at 45.
    match = idx.lookup(turn[:45] + tokens(500, 30))
    assert match is not None and match.entry.payload == "turn 1" and match.tokens == 45
    # The same prompt again matches whole.
    again = idx.lookup(turn)
    assert again is not None and again.tokens == 50


def test_less_than_a_shared_block_is_no_match() -> None:
    idx = index()
    idx.insert(tokens(0, 40), "a")
    assert idx.lookup(tokens(0, B - 1) + [999] * 30) is None
    assert idx.lookup(tokens(100, 40)) is None
    assert idx.lookup(tokens(0, 10)) is None  # shorter than a block


def test_an_edited_earlier_turn_matches_only_up_to_the_edit() -> None:
    idx = index()
    conversation = tokens(0, 100)
    idx.insert(conversation, "chat")
    edited = [*conversation[:37], 999, *conversation[38:]]
    match = idx.lookup(edited)
    assert match is not None and match.tokens == 37


def test_the_longest_of_several_candidates_wins() -> None:
    idx = index()
    system = tokens(0, 2 * B)
    idx.insert(system + tokens(100, 20), "user a")
    idx.insert(system + tokens(200, 20), "user b")
    match = idx.lookup(system + tokens(100, 10) + [7, 7])
    assert match is not None and match.entry.payload == "user a" and match.tokens == 2 * B + 10
    shared = idx.lookup(system + tokens(300, 20))  # another user, the same system prompt
    assert shared is not None and shared.tokens == 2 * B


def test_a_longer_turn_supersedes_the_entry_it_extends() -> None:
    idx = index()
    idx.insert(tokens(0, 40), "turn 1")
    idx.insert(tokens(0, 90), "turn 2")
    assert [e.payload for e in idx.entries()] == ["turn 2"]
    assert idx.used == 90
    # An entry that is not a prefix of the new one stays.
    idx.insert(tokens(0, 30) + tokens(500, 20), "branch")
    assert sorted(e.payload for e in idx.entries()) == ["branch", "turn 2"]


def test_what_is_already_held_whole_is_not_stored_again() -> None:
    idx = index()
    idx.insert(tokens(0, 90), "long")
    assert not idx.would_store(tokens(0, 60))
    assert idx.insert(tokens(0, 60), "shorter") is None
    assert [e.payload for e in idx.entries()] == ["long"]


def test_too_short_or_too_long_is_not_stored() -> None:
    idx = index(capacity=100)
    assert idx.insert(tokens(0, B - 1), "short") is None
    assert idx.insert(tokens(0, 101), "long") is None
    assert idx.insert(tokens(0, 60), "over the limit", limit=50) is None
    assert len(idx) == 0 and idx.used == 0


def test_least_recently_used_entries_are_evicted_first() -> None:
    idx = index(capacity=100)
    idx.insert(tokens(0, 40), "a")
    idx.insert(tokens(1000, 40), "b")
    assert idx.lookup(tokens(0, 40)) is not None  # a is used again: b is now the oldest
    idx.insert(tokens(2000, 40), "c")  # 120 > 100: one must go
    assert sorted(e.payload for e in idx.entries()) == ["a", "c"]
    assert idx.used == 80 and idx.evicted == 40
    assert idx.lookup(tokens(1000, 40)) is None


def test_a_lookup_without_touch_changes_no_order() -> None:
    idx = index(capacity=100)
    idx.insert(tokens(0, 40), "a")
    idx.insert(tokens(1000, 40), "b")
    idx.lookup(tokens(0, 40), touch=False)
    idx.insert(tokens(2000, 40), "c")
    assert sorted(e.payload for e in idx.entries()) == ["b", "c"]


def test_fit_evicts_down_to_what_running_sequences_leave() -> None:
    idx = index(capacity=1000)
    for n in range(5):
        idx.insert(tokens(1000 * n, 50), f"e{n}")
    assert idx.used == 250
    assert idx.fit(120) == 150  # the three oldest go
    assert [e.payload for e in idx.entries()] == ["e3", "e4"]
    assert idx.fit(1000) == 0
    assert idx.fit(0) == 100 and len(idx) == 0 and idx.used == 0
    # Nothing is left behind in the block table.
    assert idx.lookup(tokens(4000, 50)) is None


def test_clear_forgets_everything() -> None:
    idx = index()
    idx.insert(tokens(0, 40), "a")
    idx.clear()
    assert idx.used == 0 and len(idx) == 0 and idx.lookup(tokens(0, 40)) is None


def test_many_entries_behind_one_system_prompt_stay_cheap_to_search() -> None:
    idx = index(capacity=100_000)
    system = tokens(0, 4 * B)
    for user in range(200):
        idx.insert(system + tokens(10_000 + 100 * user, 20), f"user {user}")
    # The most recent candidates are compared first; a recent user finds their own chat.
    match = idx.lookup(system + tokens(10_000 + 100 * 199, 20) + [1])
    assert match is not None and match.entry.payload == "user 199"
    assert match.tokens == 4 * B + 20
    # An old one still reuses the shared system prompt at least.
    old = idx.lookup(system + tokens(10_000, 20))
    assert old is not None and old.tokens >= 4 * B
