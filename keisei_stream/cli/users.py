"""``keisei users``: create a run's least-privilege Redis users on a server (or print their rules),
put the workers on the run's roster (the set of workers whose streams the learner reads), and
print the URL each process should use (:mod:`keisei_stream.ops.acl`)."""

from __future__ import annotations

import argparse
import shlex

from keisei_stream.ops import acl, compat
from keisei_stream.wire import client
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.status import register_workers


def worker_ids(args: argparse.Namespace) -> list[str]:
    """``w0 .. w{N-1}`` for ``--workers N``, then every ``--worker-id``."""
    return [f"w{i}" for i in range(args.workers)] + list(args.worker_ids)


def command(args: argparse.Namespace) -> int:
    """Print ``redis-cli ACL SETUSER`` lines and the roster's ``SADD`` (``--rules``, for
    ``--server-version`` or the newest rules), or check the server's version, create the users,
    add the workers to the roster and print ``role user url`` per role (passwords are new random
    ones each time). Returns 0, or 2 for a server older than the minimum."""
    wids = worker_ids(args)
    keys = Keys(args.run)
    if args.rules:
        server = compat.ServerInfo(compat.parse_version(args.server_version)) if args.server_version else compat.LATEST
        for role in [*acl.ROLES, *(acl.worker_role(w) for w in wids)]:
            rules = " ".join(shlex.quote(r) for r in acl.role_rules(keys, role, server))
            print(f"ACL SETUSER {acl.username(args.run, role)} reset on '>PASSWORD' {rules}")
        if wids:
            print(f"SADD {keys.roster} {' '.join(wids)}")
        return 0
    r = client.connect(args.redis)
    try:
        server = compat.require_supported(r)
    except compat.UnsupportedServer as exc:
        print(f"error: {exc}")
        return 2
    passwords = acl.create_users(r, args.run, wids, server=server)
    register_workers(r, keys, wids)
    base = args.url or acl.strip_user(args.redis)
    for role, password in passwords.items():
        user = acl.username(args.run, role)
        print(f"{role:12s} {user:36s} {acl.user_url(base, user, password)}")
    return 0
