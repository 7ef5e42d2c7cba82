"""Learning: the algorithm, one module per step, readable top to bottom.

- :mod:`.model`: the actor-critic ResNet (GroupNorm, pointer or dense policy head).
- :mod:`.policy`: the masked categorical policy: sampling, log-probabilities, entropy.
- :mod:`.selfplay`: self-play: N games, one batched forward pass per step, trajectories, batches.
- :mod:`.gae`: GAE with the zero-sum sign flip, the staleness filter.
- :mod:`.ppo`: the optimiser, its schedule and one decoupled-PPO update.
- :mod:`.trainer`: one learner update from a batch: staleness, inputs, proximal pass, GAE, PPO, metrics.
- :mod:`.inputs`: the learner's inputs expanded on the device from their compact form.
- :mod:`.checkpoint`: checkpoints and the published weights blob.
- :mod:`.distributed`: the collectives of several learner ranks (the identity on one process).

Imports torch, never redis: everything here runs the same inside a worker, the learner, the
evaluator and a test, with no server. It reads the experience batch format
(:mod:`keisei_stream.wire.codec`) that the worker sends and the learner receives.
"""
