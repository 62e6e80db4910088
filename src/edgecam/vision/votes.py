"""Per-track labels by voting over frames, with hysteresis.

The rule, for the mask profile: every frame on which a detection hits a track, the classifier
casts one vote, "mask" when P(mask) >= ``mask_threshold`` else "no mask". A track keeps its
last ``window`` votes. With fewer than ``min_votes`` votes it is ``undecided``. An undecided
track takes a label once that label's share of the kept votes reaches ``enter``; a labelled
track keeps its label until that label's share falls below ``leave`` (hysteresis: one odd
frame does not flip a label), then it is ``undecided`` again (and may at once take the other
label if that one reaches ``enter``).

A labelled track whose last ``settle_votes`` votes all agree with its label is *settled*
until ``recheck_frames`` frames pass without a vote: live, the detector skips the classifier
for its faces (they cast no vote), so a settled track is classified about once every
``recheck_frames`` frames instead of on every detection, and one disagreeing vote unsettles it.

For profiles without a classifier every track is labelled with the profile's single label.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edgecam.config import VotingConfig

__all__ = ["MASK", "NO_MASK", "PERSON", "UNDECIDED", "LabelVoter", "TrackVotes"]

MASK = "mask"
NO_MASK = "no_mask"
UNDECIDED = "undecided"
PERSON = "person"


@dataclass(slots=True)
class TrackVotes:
    """The vote history and current label of one track."""

    votes: deque[bool]
    label: str = UNDECIDED
    first_frame: int = 0
    last_frame: int = 0
    counted: bool = field(default=False)
    last_vote_frame: int = -1
    streak: int = 0  # how many of the latest votes in a row equal the latest one

    def vote(self, vote: bool) -> None:
        self.streak = self.streak + 1 if self.votes and self.votes[-1] == vote else 1
        self.votes.append(vote)


class LabelVoter:
    """Keeps one :class:`TrackVotes` per track id and applies the voting rule."""

    def __init__(self, config: VotingConfig, *, classify: bool = True, label: str = PERSON):
        self._config = config
        self._classify = classify
        self._fixed_label = label
        self._tracks: dict[int, TrackVotes] = {}

    @property
    def labels(self) -> tuple[str, ...]:
        """Every label this voter can give, in display order."""
        return (MASK, NO_MASK, UNDECIDED) if self._classify else (self._fixed_label,)

    def update_states(
        self, frame: int, track_ids: np.ndarray, attribute: np.ndarray, matched: np.ndarray
    ) -> list[TrackVotes]:
        """Record this frame's votes; return the state of every track, in order."""
        states: list[TrackVotes] = []
        for tid, p, hit in zip(
            track_ids.tolist(), attribute.tolist(), matched.tolist(), strict=True
        ):
            st = self._tracks.get(tid)
            if st is None:
                st = TrackVotes(deque(maxlen=self._config.window), first_frame=frame)
                st.label = UNDECIDED if self._classify else self._fixed_label
                self._tracks[tid] = st
            st.last_frame = frame
            if self._classify and hit and p == p:  # p == p: not NaN
                st.vote(p >= self._config.mask_threshold)
                st.last_vote_frame = frame
                st.label = self._decide(st)
            states.append(st)
        self._forget_before(frame - 10 * self._config.window - 300)
        return states

    def settled(self, st: TrackVotes, frame: int) -> bool:
        """Whether ``st``'s label needs no more votes at ``frame`` (see the module's rule)."""
        n = self._config.settle_votes
        if not n or st.label not in (MASK, NO_MASK) or len(st.votes) < n:
            return False
        if frame - st.last_vote_frame >= self._config.recheck_frames:
            return False
        return st.streak >= n and st.votes[-1] == (st.label == MASK)

    def _decide(self, st: TrackVotes) -> str:
        cfg = self._config
        n = len(st.votes)
        if n < cfg.min_votes:
            return UNDECIDED
        share_mask = sum(st.votes) / n
        share = {MASK: share_mask, NO_MASK: 1.0 - share_mask}
        if st.label in share and share[st.label] >= cfg.leave:
            return st.label
        for label in (MASK, NO_MASK):
            if share[label] >= cfg.enter:
                return label
        return UNDECIDED

    def _forget_before(self, frame: int) -> None:
        if len(self._tracks) > 64:
            stale = [tid for tid, st in self._tracks.items() if st.last_frame < frame]
            for tid in stale:
                del self._tracks[tid]
