"""The game layer: cshogi rules, core46 observations, the 13,527-action space, a vectorised env.

Never imports torch or redis. See :mod:`.actions` (action index layout), :mod:`.observation`
(plane layout) and :mod:`.env` (end rules, rewards, game records).
"""

from .actions import (
    BOARD_MOVE_ACTIONS,
    NUM_ACTIONS,
    action_to_move,
    action_to_usi,
    legal_mask,
    legal_moves_and_actions,
    moves_to_actions,
    usi_to_action,
)
from .env import STARTING_SFEN, EndReason, GameRecord, StepResult, VecEnv, validate_sfen
from .observation import HAND_MAX, NUM_PLANES, encode_observation, encode_positions

__all__ = [
    "BOARD_MOVE_ACTIONS",
    "HAND_MAX",
    "NUM_ACTIONS",
    "NUM_PLANES",
    "STARTING_SFEN",
    "EndReason",
    "GameRecord",
    "StepResult",
    "VecEnv",
    "action_to_move",
    "action_to_usi",
    "encode_observation",
    "encode_positions",
    "legal_mask",
    "legal_moves_and_actions",
    "moves_to_actions",
    "usi_to_action",
    "validate_sfen",
]
