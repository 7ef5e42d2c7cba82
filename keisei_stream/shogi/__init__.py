"""The game layer: cshogi rules, core46 observations, the 13,527-action space, a vectorised env.

Never imports torch or redis. See :mod:`.actions` (action index layout), :mod:`.observation`
(plane layout), :mod:`.referee` (end rules and reasons, repetition counting, random openings,
game records: the one referee for self-play, matches and replays) and :mod:`.env` (the
vectorised env, rewards).
"""

from .actions import (
    BOARD_MOVE_ACTIONS, NUM_ACTIONS, action_to_move, action_to_usi, legal_mask, legal_moves_and_actions,
    moves_to_actions, usi_to_action,
)
from .env import StepResult, VecEnv, validate_sfen
from .observation import HAND_MAX, NUM_PLANES, encode_observation, encode_positions, encode_positions_compact
from .referee import (
    BOARD_END_REASONS, MOVER_SCORES, ONGOING, STARTING_SFEN, EndReason, GameRecord, RepetitionTracker, Verdict,
    can_declare, judge, legal_move_from_usi, random_opening, repetition_feature,
)

__all__ = [
    "BOARD_END_REASONS", "BOARD_MOVE_ACTIONS", "MOVER_SCORES", "HAND_MAX", "NUM_ACTIONS", "NUM_PLANES", "ONGOING",
    "STARTING_SFEN", "EndReason", "GameRecord", "RepetitionTracker", "StepResult", "VecEnv", "Verdict",
    "action_to_move", "action_to_usi", "can_declare", "encode_observation", "encode_positions", "encode_positions_compact", "judge",
    "legal_mask", "legal_move_from_usi", "legal_moves_and_actions", "moves_to_actions", "random_opening", "repetition_feature",
    "usi_to_action", "validate_sfen",
]
