from __future__ import annotations

from lpreg_core.staleness import Admission, is_stale, staleness


def test_synchronous_admission_issues_one_step_at_a_time() -> None:
    a = Admission(prompts_per_step=4, max_staleness=0)
    assert a.num_to_issue(version=0, issued_fresh=0) == 4
    assert a.num_to_issue(version=0, issued_fresh=4) == 0
    assert a.num_to_issue(version=1, issued_fresh=4) == 4


def test_async_admission_allows_max_staleness_steps_ahead() -> None:
    a = Admission(prompts_per_step=4, max_staleness=2)
    assert a.issue_limit(0) == 12
    assert a.num_to_issue(version=3, issued_fresh=12) == 12
    assert a.num_to_issue(version=0, issued_fresh=20) == 0


def test_staleness_of_groups() -> None:
    assert staleness(5, 5) == 0
    assert staleness(5, 3) == 2
    assert staleness(3, 5) == 0  # a generator ahead of a resumed learner is not negative
    assert not is_stale(5, 4, max_staleness=1)
    assert is_stale(5, 3, max_staleness=1)
    assert is_stale(1, 0, max_staleness=0)
