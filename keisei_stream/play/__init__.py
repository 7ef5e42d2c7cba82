"""Playing: players (random, greedy, network, USI engines), matches and Elo, continuous
evaluation, the USI engine adapter and game records."""
