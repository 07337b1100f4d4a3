"""Off-policyness control: admission of new prompt tasks and the staleness of rollout groups.

DESIGN.md: at policy version v the learner has issued at most (v + max_staleness + 1) * B prompt
groups in total (B = prompt groups per step), and drops groups whose oldest token was sampled more
than max_staleness versions ago. max_staleness = 0 is synchronous on-policy training.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Admission:
    prompts_per_step: int
    max_staleness: int

    def issue_limit(self, version: int) -> int:
        """Total prompt groups that may have been issued by the time the policy is at `version`."""
        return (version + self.max_staleness + 1) * self.prompts_per_step

    def num_to_issue(self, version: int, issued_fresh: int) -> int:
        """How many new prompts to issue now (re-issues of dropped prompts are not counted:
        they replace groups that will never be trained)."""
        return max(0, self.issue_limit(version) - issued_fresh)


def staleness(current_version: int, oldest_token_version: int) -> int:
    """Versions between the oldest token of a group and the policy about to be updated."""
    return max(0, current_version - oldest_token_version)


def is_stale(current_version: int, oldest_token_version: int, max_staleness: int) -> bool:
    return staleness(current_version, oldest_token_version) > max_staleness
