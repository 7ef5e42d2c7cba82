"""What crosses process boundaries, one module per concern:

- :mod:`.keys`: the Redis key names of a run.
- :mod:`.client`: the Redis client every process uses (timeouts, the one retry policy).
- :mod:`.retry`: the retry policy, outage bookkeeping and the stop flag.
- :mod:`.codec`: encoding an :class:`~keisei_stream.experience.ExperienceBatch` (the batch type and
  its columns live in :mod:`keisei_stream.experience`) to one stream entry, and validated decoding.
- :mod:`.errors`: :class:`~.errors.BadEntry`, the one exception of that validation.
- :mod:`.replay`: HCP validation and replay of segments with cshogi, following each game across its
  segments (used by the decoder).
- :mod:`.producer` / :mod:`.consumer`: a worker's adds to its own stream within its credit; the
  learner's consumer group over the workers' streams, the credit, the delivery states.
- :mod:`.atomic`: groups of writes that run atomically, past ``maxmemory``, only in the run's
  epoch; the one outage check (``EpochWatch``).
- :mod:`.weights`: publishing, reading and watching model weights.
- :mod:`.status`: the roster, heartbeats, learner status, metrics / games / eval streams, control,
  config, accounting (per worker), credit and confinement counters, stream state.
- :mod:`.archive`: the learner's move of the workers' games into ``games``, and its archive of
  finished games (consumer group ``recorders``).

Never imports torch: weights travel as bytes, and a monitor needs no deep-learning stack.
"""
