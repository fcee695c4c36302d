"""A node's token salt at its first start (node/token_salt.py): kept, chosen against the
seed's ring, or 0 when the seed is from before salts or no seed answers."""

from __future__ import annotations

from pacsnode.node.token_salt import first_token_salt
from pacsnode.ring.placement import Member, SiteReplicas
from pacsnode.ring.token_choice import TOKEN_SALT_CANDIDATES, choose_token_salt, site_balance

POLICY = SiteReplicas.of({"east": 1, "west": 1})
ME = Member("e3", site="east")
RING = [Member("e1", site="east", token_salt=1), Member("e2", site="east", token_salt=5),
        Member("w1", site="west", token_salt=2)]


def test_the_first_node_of_a_cluster_takes_salt_1() -> None:
    assert first_token_salt("c", ME, POLICY, [], lambda seed: None) == 1


def test_a_seed_that_lists_its_members_decides_the_salt() -> None:
    asked: list[str] = []

    def ask(seed: str) -> list[Member] | None:
        asked.append(seed)
        return None if seed == "down:1" else RING

    salt = first_token_salt("c", ME, POLICY, ["down:1", "up:2", "never:3"], ask)
    assert asked == ["down:1", "up:2"]
    assert salt == choose_token_salt("c", RING, ME, POLICY)
    assert 1 <= salt <= TOKEN_SALT_CANDIDATES


def test_a_seed_from_before_salts_or_no_answer_gives_salt_0() -> None:
    assert first_token_salt("c", ME, POLICY, ["old:1", "new:2"], lambda seed: [] if seed == "old:1" else RING) == 0
    assert first_token_salt("c", ME, POLICY, ["a:1", "b:2"], lambda seed: None) == 0


def test_the_chosen_salt_is_the_best_balanced_candidate() -> None:
    chosen = choose_token_salt("c", RING, ME, POLICY)
    scores = {salt: site_balance("c", [*RING, Member("e3", site="east", token_salt=salt)], "east", POLICY)
              for salt in range(1, TOKEN_SALT_CANDIDATES + 1)}
    assert scores[chosen] == min(scores.values())
    assert len(set(scores.values())) > 1  # The candidates differ: the choice matters.
    # A site with no copies has nothing to balance: any salt, the first.
    assert choose_token_salt("c", RING, Member("x", site="north"), POLICY) == 1
