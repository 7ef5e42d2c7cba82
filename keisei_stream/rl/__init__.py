"""Learning: the actor-critic network, the masked policy, GAE and PPO, checkpoints and weights.

Imports torch, never redis: everything here runs the same inside a worker, the learner, the
evaluator and a test, with no server.
"""
