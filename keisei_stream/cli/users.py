"""``keisei users``: create a run's least-privilege Redis users on a server (or print their rules),
put the workers on the run's roster (the set of workers whose streams the learner reads), and
print the URL each process should use (:mod:`keisei_stream.ops.acl`)."""

from __future__ import annotations

import argparse
import shlex

from keisei_stream.ops import acl, compat
from keisei_stream.wire import client
from keisei_stream.wire.keys import Keys


def worker_ids(args: argparse.Namespace) -> list[str]:
    """``w0 .. w{N-1}`` for ``--workers N``, then every ``--worker-id``."""
    return [f"w{i}" for i in range(args.workers)] + list(args.worker_ids)


def command(args: argparse.Namespace) -> int:
    """Print ``redis-cli ACL SETUSER`` lines and the roster's ``SADD`` (``--rules``, for
    ``--server-version`` or the newest rules), or check each server's version, create the users on
    every ``--redis`` server with the same passwords (ACL users are not replicated: every node a
    process may reach needs them, the primary, its replicas, a Sentinel group's other nodes), add
    the workers to the roster on each server that is a primary (``ROLE``: a replica gets it by
    replication) and print ``role user url`` per role (passwords are new random ones each time,
    unless ``--role`` with ``--password``). Returns 0, or 2 for a server older than the minimum
    or ``--role`` without a password."""
    wids = worker_ids(args)
    keys = Keys(args.run)
    if args.rules:
        server = compat.ServerInfo(compat.parse_version(args.server_version)) if args.server_version else compat.LATEST
        for role in [*acl.ROLES, *(acl.worker_role(w) for w in wids)]:
            rules = " ".join(shlex.quote(r) for r in acl.role_rules(keys, role, server, args.host_copies))
            print(f"ACL SETUSER {acl.username(args.run, role)} reset on '>PASSWORD' {rules}")
        if wids:
            print(f"SADD {keys.roster} {' '.join(wids)}")
        return 0
    if args.role and not args.password:
        print("error: --role needs --password (or KEISEI_USER_PASSWORD): the user's password on the primary")
        return 2
    clients = [client.connect(url) for url in args.redis]
    try:
        passwords = acl.create_on_nodes(clients, args.run, wids, {args.role: args.password} if args.role else None,
                                        role=args.role, host_copies=args.host_copies)
    except compat.UnsupportedServer as exc:
        print(f"error: {exc}")
        return 2
    finally:
        for c in clients:
            c.close()
    base = args.url or acl.strip_user(args.redis[0])
    for role, password in passwords.items():
        user = acl.username(args.run, role)
        print(f"{role:12s} {user:36s} {acl.user_url(base, user, password)}")
    return 0
