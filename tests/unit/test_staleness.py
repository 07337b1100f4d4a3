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
