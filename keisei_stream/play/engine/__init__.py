"""The engine: the trained network choosing moves, by its raw policy or by a PUCT tree search, and
the USI server around it (``keisei usi``).

- :mod:`.tree`: the search tree's nodes, exact values of finished games, the tree kept between
  searches, limits, counters, results;
- :mod:`.leaves`: the batched leaf evaluation (observations, one forward pass, priors);
- :mod:`.puct`: one simulation's arithmetic (PUCT choice, virtual loss, backup, root noise) and
  the search options;
- :mod:`.shortcuts`: what the root answers without a search (no legal move, entering king, a mate
  found, a forced move);
- :mod:`.mcts`: the search driver (:class:`~.mcts.MCTS`: simulations, batches, limits);
- :mod:`.search_player`: the search as a match player (``search:`` specs);
- :mod:`.model_player`: loading a checkpoint, and the raw policy as a player (``checkpoint:``);
- :mod:`.protocol`, :mod:`.usi_options`, :mod:`.usi_job`, :mod:`.usi_server`: the USI protocol's
  arguments, clock and ``info`` line; the engine's options and ``setoption``; one ``go``'s search
  thread and when its ``bestmove`` is sent; the engine's command loop (``keisei usi``).

Never imports redis or :mod:`keisei_stream.play.evaluation`; torch only where a model runs (not
for ``usi``, which is answered before the model loads).
"""
