"""Playing shogi with the trained network, split by job:

- :mod:`keisei_stream.play.engine`: the engine, i.e. the network choosing moves (raw policy, PUCT
  tree search) and the USI server around it (``keisei usi``);
- :mod:`keisei_stream.play.evaluation`: matches between players, Elo, the USI client, continuous
  evaluation of a run (``keisei eval``);
- :mod:`keisei_stream.play.players`: the player protocol both of them use (and its errors);
- :mod:`keisei_stream.play.records`: game records (the ``games`` stream's fields, KIF / CSA / USI
  export, pictures), for the evaluation and the command layer (``keisei games``).

The engine never imports the evaluation; the evaluation builds the engine's players.
"""
