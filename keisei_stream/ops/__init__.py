"""Operations: what starts and secures the servers and processes of a run, not what crosses
between them.

- :mod:`.embedded_redis`: a private Redis server for one run.
- :mod:`.acl`: the run's least-privilege Redis users, one per role.

Never imports torch.
"""
