"""Playing: players (random, greedy, network, USI engines) built from spec strings, matches and
Elo, continuous evaluation, the USI engine adapter and game records."""
