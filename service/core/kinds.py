"""The loop kinds and what each one does differently: the one table code asks instead of
comparing kind names.

- `cb`: a contextual bandit, Personalizer's single-slot loop (rank -> one reward per event);
- `ccb`: a multi-slot page (rank a slot at a time, a reward per slot);
- `rl`: reinforcement learning over episodes of rank steps (the learner trains whole episodes,
  which it reads from the database, and the server explores around VW's Q values).
"""

from __future__ import annotations

from dataclasses import dataclass

from learners.cb import DEFAULT_POLICY, PERSONALIZER_POLICY
from learners.ccb import DEFAULT_CCB_POLICY, PERSONALIZER_CCB_POLICY
from learners.rl import DEFAULT_RL_EXPLORATION, DEFAULT_RL_POLICY


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    arguments: str

    def doc(self) -> dict[str, str]:
        """The policy as stored and answered (Personalizer's PolicyContract)."""
        return {"name": self.name, "arguments": self.arguments}


@dataclass(frozen=True, slots=True)
class LoopKind:
    name: str
    policy: Policy  # dloop's default: a new loop's policy and what a reset returns to
    personalizer_policy: Policy | None = None  # Personalizer's exact default (it had no RL)
    multi_slot: bool = False  # ranked through /multislot/rank, rewarded per slot
    episodic: bool = False  # decisions are steps of episodes, learned a whole episode at a time
    auto_optimize: bool = False  # the policy search of auto-optimisation applies to it
    explores_in_vw: bool = True  # False: VW scores, the server explores (learners.rl)
    # A new loop's explorationPercentage: Personalizer's 0.2 for bandits; an RL loop's
    # epsilon-greedy explores a whole episode with it (learners.rl.DEFAULT_RL_EXPLORATION).
    exploration: float = 0.2


CB = LoopKind(
    "cb",
    Policy("dloop-default", DEFAULT_POLICY),
    Policy("personalizer-default", PERSONALIZER_POLICY),
    auto_optimize=True,
)
CCB = LoopKind(
    "ccb",
    Policy("dloop-ccb", DEFAULT_CCB_POLICY),
    Policy("personalizer-ccb-default", PERSONALIZER_CCB_POLICY),
    multi_slot=True,
)
RL = LoopKind(
    "rl",
    Policy("dloop-rl", DEFAULT_RL_POLICY),
    episodic=True,
    explores_in_vw=False,
    exploration=DEFAULT_RL_EXPLORATION,
)

KINDS: dict[str, LoopKind] = {k.name: k for k in (CB, CCB, RL)}


def loop_kind(name: str) -> LoopKind:
    """The kind called `name` (KeyError for a name that is not a kind)."""
    return KINDS[name]
