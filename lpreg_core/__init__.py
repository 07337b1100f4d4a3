"""lpreg_core: the pure library of lpreg.

Lp-Reg loss and the baseline losses (`lpreg_core.loss`), GRPO advantages (`advantages`), reward
verifiers (`rewards`), the tiny arithmetic task (`tasks`), prompt sources (`data`), staleness
control (`staleness`), the rollout wire schema and its validation (`rollout`), transport
interfaces (`transport`), weight-bucket planning (`weights`) and the typed config (`config`).
No sockets, no processes, no device placement: import it in a notebook.
"""

__version__ = "0.1.0"
