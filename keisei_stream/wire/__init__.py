"""What crosses process boundaries, one module per concern:

- :mod:`.keys`: the Redis key names of a run.
- :mod:`.schema`: the column schema of an experience batch (one definition of every column).
- :mod:`.codec`: :class:`~.codec.ExperienceBatch`, encoding to and validated decoding from one
  stream entry.
- :mod:`.replay`: HCP validation and replay of whole games with cshogi (used by the decoder).
- :mod:`.producer` / :mod:`.consumer`: the experience stream's admission and consumer group.
- :mod:`.weights`: publishing, reading and watching model weights.
- :mod:`.status`: heartbeats, learner status, metrics / games / eval streams, control, config,
  accounting, stream state.
- :mod:`.embedded_redis`: a private Redis server and the client settings every process uses.

Never imports torch: weights travel as bytes, and a monitor needs no deep-learning stack.
"""
