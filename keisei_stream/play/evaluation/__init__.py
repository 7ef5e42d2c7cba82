"""The evaluation: players built from spec strings, matches judged by the referee, Elo, and the
continuous evaluation of a run over Redis (``keisei eval``).

- :mod:`.baselines`: the players without a model (random, 1-ply greedy);
- :mod:`.usi_client`: an external USI engine as a player;
- :mod:`.run_weights`: a run's published weights from Redis as a model (``redis:`` specs);
- :mod:`.specs`: player spec strings -> players (the engine's players for ``checkpoint:`` and
  ``search:``);
- :mod:`.match`: one game (``play_game``) and a match over processes (``play_match``);
- :mod:`.elo`: Elo arithmetic of a match result;
- :mod:`.follow`: continuous evaluation of a run and its Elo table in Redis (``keisei eval --follow``).
"""
