"""Simulated users with different tastes on the bundled digits pairs: the test material of personalised preference fine-tuning.

User u prefers the digits of a set S_u: of a pair in which exactly one image's classifier digit (columns ``digit_0`` /
``digit_1`` of the bundled data) is in S_u, the user prefers that image (no noise); pairs where both or neither are in S_u
say nothing about the user and are not given to them. Each usable pair goes to one user (the one with the fewest pairs so
far among those it is informative for; ties to the lower id), so the users' pair sets are disjoint and about balanced. The
true utility of an image for user u is p(y ∈ S_u | x) under the bundled classifier (:func:`set_utility`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

#: the simulated users: id -> preferred digits. 0-3 train ("seen"), 4-5 are held out ("unseen") in the benchmark
USER_DIGIT_SETS: dict[int, tuple[int, ...]] = {0: (0, 6, 8, 9), 1: (1, 4, 7), 2: (2, 3, 5), 3: (0, 1, 2, 3, 4), 4: (5, 6, 7, 8, 9), 5: (0, 2, 4, 6, 8)}
SEEN_USERS = (0, 1, 2, 3)
UNSEEN_USERS = (4, 5)


def personalized_preferences(dataset, users: Mapping[int, Sequence[int]] | None = None):
    """Relabel the bundled pairs ``dataset`` (with ``digit_0`` / ``digit_1`` columns) for the simulated ``users`` (default
    :data:`USER_DIGIT_SETS`): a ``datasets.Dataset`` in the Pick-a-Pic layout with ``user_id`` and hard labels."""
    users = dict(USER_DIGIT_SETS if users is None else users)
    d0, d1 = list(dataset["digit_0"]), list(dataset["digit_1"])
    counts = {u: 0 for u in users}
    keep, owner, label = [], [], []
    for row, (a, b) in enumerate(zip(d0, d1)):
        informative = [u for u, s in users.items() if (a in s) != (b in s)]
        if not informative:
            continue
        u = min(informative, key=lambda v: (counts[v], v))
        counts[u] += 1
        keep.append(row)
        owner.append(u)
        label.append(1.0 if a in users[u] else 0.0)
    out = dataset.select(keep)
    out = out.remove_columns([c for c in ("label_0", "user_id", "minority") if c in out.column_names])
    return out.add_column("label_0", label).add_column("user_id", owner)


@torch.no_grad()
def set_utility(classifier, images: torch.Tensor, digits: Sequence[int], batch_size: int = 512) -> torch.Tensor:
    """p(y ∈ digits | x) under ``classifier`` for images (N, 3, H, W) in [0, 1] -> (N,)."""
    idx = torch.tensor(sorted(set(int(d) for d in digits)))
    out = []
    for start in range(0, len(images), batch_size):
        probs = torch.softmax(classifier(images[start:start + batch_size].float()), dim=-1)
        out.append(probs[:, idx].sum(-1).cpu())
    return torch.cat(out)


__all__ = ["SEEN_USERS", "UNSEEN_USERS", "USER_DIGIT_SETS", "personalized_preferences", "set_utility"]
