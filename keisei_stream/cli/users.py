"""``keisei users``: create a run's least-privilege Redis users on a server (or print their rules)
and print the URL each process should use (:mod:`keisei_stream.ops.acl`)."""

from __future__ import annotations

import argparse
import shlex

from keisei_stream.ops import acl
from keisei_stream.wire import client
from keisei_stream.wire.keys import Keys


def command(args: argparse.Namespace) -> int:
    """Print ``redis-cli ACL SETUSER`` lines (``--rules``), or create the users and print
    ``role user url`` per role (passwords are new random ones each time). Returns 0."""
    if args.rules:
        for role in acl.ROLES:
            rules = " ".join(shlex.quote(r) for r in acl.role_rules(Keys(args.run), role))
            print(f"ACL SETUSER {acl.username(args.run, role)} reset on '>PASSWORD' {rules}")
        return 0
    r = client.connect(args.redis)
    passwords = acl.create_users(r, args.run)
    base = args.url or acl.strip_user(args.redis)
    for role, password in passwords.items():
        user = acl.username(args.run, role)
        print(f"{role:10s} {user:32s} {acl.user_url(base, user, password)}")
    return 0
