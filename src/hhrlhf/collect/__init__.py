"""`hhrlhf collect`: the feedback interface that made HH-RLHF, run by a lab for its own annotators.

Annotators talk to a policy; at each turn they see two responses and pick one (comparison
tasks), or one response and rate the attempt at the end (red teaming); reviewers tag finished
attempts. Everything is stored in SQLite (or Postgres) as it happens; ``hhrlhf collect export``
writes the official file formats.
"""

from hhrlhf.collect.store import Store, open_store

__all__ = ["Store", "open_store"]
