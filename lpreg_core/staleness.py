"""Off-policyness control, in one place: admission of prompt tasks, the staleness of rollout
groups, and when a generator should stop sampling.

docs/design.md, section 4: at most (max_staleness + 1) * B prompt groups are outstanding at any time (issued,
re-issues included, and not yet trained, dropped or dead-lettered; B = prompt groups per step).
Admission counts work, not version numbers, so a learner resume that skips versions cannot inflate
it. Groups whose oldest token was sampled more than max_staleness versions before the policy about
to be updated are dropped (and their prompts re-issued). max_staleness = 0 is synchronous
on-policy training: the learner publishes and waits for every generator to load before sampling
resumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def staleness(current_version: int, oldest_token_version: int) -> int:
    """Versions between the oldest token of a group and the policy about to be updated."""
    return max(0, current_version - oldest_token_version)


def lineage_distance(current: int, sampled: int, aliases: Sequence[tuple[int, int]]) -> int:
    """Policy versions between the weights that sampled a token (``sampled``) and the current
    ones, along the current weights' lineage.

    A learner that resumes from a checkpoint gives the restored weights a fresh version number
    (the lost process may have published later ones): ``aliases`` holds ``(new, base)`` pairs,
    sorted by ``new``, meaning "version ``new`` is the weights of version ``base``". Tokens of an
    ancestor are ``current - sampled`` steps behind, counted without the jumps; tokens of a branch
    lost with a crashed learner are as far as the branch point plus their own steps past it.
    Without aliases this is ``max(0, current - sampled)``.
    """
    distance = 0
    for new, base in reversed(aliases):
        if sampled >= new or new > current:
            break
        distance += current - new  # steps since the weights were restored
        current = base
        if sampled > base:  # sampled on the branch the crash lost
            return distance + (sampled - base)
    return distance + max(0, current - sampled)


@dataclass(frozen=True)
class StalenessPolicy:
    """The rules both service loops follow, built from ``learner.prompts_per_step`` and
    ``learner.max_staleness``."""

    prompts_per_step: int
    max_staleness: int

    def __post_init__(self) -> None:
        if self.prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {self.prompts_per_step}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")

    @property
    def max_outstanding(self) -> int:
        """Prompt groups that may be outstanding at once."""
        return (self.max_staleness + 1) * self.prompts_per_step

    def num_to_issue(self, outstanding: int) -> int:
        """How many new prompts to issue when ``outstanding`` groups are still in flight."""
        return max(0, self.max_outstanding - outstanding)

    def too_far(self, distance: int) -> bool:
        """True when tokens ``distance`` versions behind (``lineage_distance``) are too old."""
        return distance > self.max_staleness

    def is_stale(self, current_version: int, oldest_token_version: int) -> bool:
        """True when a group sampled from ``oldest_token_version`` on is too old to train at
        ``current_version``."""
        return staleness(current_version, oldest_token_version) > self.max_staleness

    def generator_should_wait(self, learner_version: int, loaded_version: int) -> bool:
        """True when everything a generator holding ``loaded_version`` samples now would arrive
        stale: it waits for newer weights instead of spending compute."""
        return learner_version - loaded_version > self.max_staleness

    @property
    def synchronous(self) -> bool:
        """Each publish waits until every generator has loaded the new version."""
        return self.max_staleness == 0
