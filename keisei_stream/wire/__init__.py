"""What crosses process boundaries: Redis keys, the experience batch schema and codec, replay
validation, the producer and consumer of the experience stream, weights, status hashes and the
embedded Redis server.

Never imports torch: weights travel as bytes, and a monitor needs no deep-learning stack.
"""
