from __future__ import annotations

import pytest

from lpreg_core.staleness import StalenessPolicy, staleness


def test_synchronous_admission_issues_one_step_at_a_time() -> None:
    p = StalenessPolicy(prompts_per_step=4, max_staleness=0)
    assert p.synchronous
    assert p.num_to_issue(outstanding=0) == 4
    assert p.num_to_issue(outstanding=4) == 0
    assert p.num_to_issue(outstanding=1) == 3


def test_async_admission_counts_outstanding_work_not_versions() -> None:
    p = StalenessPolicy(prompts_per_step=4, max_staleness=2)
    assert not p.synchronous
    assert p.max_outstanding == 12
    assert p.num_to_issue(outstanding=0) == 12
    assert p.num_to_issue(outstanding=12) == 0
    # More outstanding than the limit (e.g. read back after a restart) issues nothing.
    assert p.num_to_issue(outstanding=20) == 0


def test_staleness_of_groups() -> None:
    assert staleness(5, 5) == 0
    assert staleness(5, 3) == 2
    assert staleness(3, 5) == 0  # a generator ahead of a resumed learner is not negative
    one = StalenessPolicy(prompts_per_step=1, max_staleness=1)
    assert not one.is_stale(5, 4)
    assert one.is_stale(5, 3)
    assert StalenessPolicy(prompts_per_step=1, max_staleness=0).is_stale(1, 0)


def test_generators_wait_when_their_samples_would_arrive_stale() -> None:
    p = StalenessPolicy(prompts_per_step=1, max_staleness=1)
    assert not p.generator_should_wait(learner_version=5, loaded_version=4)
    assert p.generator_should_wait(learner_version=6, loaded_version=4)


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="prompts_per_step"):
        StalenessPolicy(prompts_per_step=0, max_staleness=0)
    with pytest.raises(ValueError, match="max_staleness"):
        StalenessPolicy(prompts_per_step=1, max_staleness=-1)


def test_lineage_distance_counts_steps_along_the_restored_weights() -> None:
    from lpreg_core.staleness import lineage_distance

    assert lineage_distance(7, 4, []) == 3
    assert lineage_distance(4, 7, []) == 0
    # A learner checkpointed at v10 dies after publishing v12; the restored weights are v13.
    aliases = [(13, 10)]
    assert lineage_distance(13, 10, aliases) == 0  # sampled by the very weights restored
    assert lineage_distance(13, 9, aliases) == 1
    assert lineage_distance(13, 12, aliases) == 2  # two steps down the lost branch
    assert lineage_distance(15, 10, aliases) == 2  # two steps trained since the resume
    assert lineage_distance(15, 12, aliases) == 4
    assert lineage_distance(15, 14, aliases) == 1  # after the resume: plain counting
    # A second resume from the same checkpoint, before any new one was written.
    twice = [(13, 10), (17, 10)]
    assert lineage_distance(17, 10, twice) == 0
    assert lineage_distance(17, 14, twice) == 4  # on the branch lost the second time


def test_policy_judges_distances() -> None:
    p = StalenessPolicy(prompts_per_step=1, max_staleness=1)
    assert not p.too_far(1)
    assert p.too_far(2)
