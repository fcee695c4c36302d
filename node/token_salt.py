"""The node's token salt at start: kept from its identity, or chosen once against its seeds' ring.

ring/token_choice.py says which salt balances a site best; this module asks a seed for the
ring (Admin.RingView, whose reply lists the members with their salts) and decides what to do
when it cannot:

- a data dir that has a salt keeps it: a node never changes its tokens;
- a data dir from before salts (identity.json without one) keeps salt 0, the tokens it had;
- a new node without seeds (the first of a cluster) takes salt 1: nothing to balance against;
- a new node with seeds asks them in turn: the first that lists its members decides the
  salt; a seed that answers without members is from before salts, so the joiner takes 0
  (that seed would compute its tokens with 0); no seed answering: 0 as well, the safe
  choice when the cluster's version is unknown (random tokens, as before salts).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import grpc

from pacsnode.node import peer_wire
from pacsnode.node.peer_server import GRPC_OPTIONS, describe_rpc_error
from pacsnode.node.tls import CHANNEL_OPTIONS
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc
from pacsnode.ring.placement import Member, Replication
from pacsnode.ring.token_choice import choose_token_salt

log = logging.getLogger(__name__)

RING_ASK_TIMEOUT_S = 5.0  # One seed's RingView at a first start; then the next seed.


def ring_members_of(seed: str, dialled: str, envelope: pb.Envelope,
                    credentials: grpc.ChannelCredentials | None) -> list[Member] | None:
    """The ring members `seed` reports with their salts; [] from a seed from before salts;
    None when it does not answer."""
    channel = (grpc.insecure_channel(dialled, options=GRPC_OPTIONS) if credentials is None else
               grpc.secure_channel(dialled, credentials, options=GRPC_OPTIONS + CHANNEL_OPTIONS))
    try:
        reply = pb_grpc.AdminStub(channel).RingView(pb.RingViewRequest(envelope=envelope),
                                                    timeout=RING_ASK_TIMEOUT_S)
    except grpc.RpcError as error:
        log.info("node.token_salt.seed_unanswered seed=%s error=%s", seed, describe_rpc_error(error))
        return None
    finally:
        channel.close()
    members = []
    for message in reply.members:
        try:
            members.append(peer_wire.update_from_wire(message).info.as_ring_member())
        except ValueError as error:
            log.warning("node.token_salt.bad_member seed=%s error=%s", seed, error)
    return members


def first_token_salt(cluster_id: str, me: Member, replication: Replication, seeds: Sequence[str],
                     ask: Callable[[str], list[Member] | None]) -> int:
    """The salt of a node's first start (no salt in its identity yet); `ask(seed)` is
    `ring_members_of` for that seed."""
    if not seeds:
        return 1
    for seed in seeds:
        members = ask(seed)
        if members is None:
            continue
        if not members:
            log.warning("node.token_salt.old_seed seed=%s: it reports no salts; taking salt 0", seed)
            return 0
        salt = choose_token_salt(cluster_id, members, me, replication)
        log.info("node.token_salt.chosen salt=%d seed=%s members=%d", salt, seed, len(members))
        return salt
    log.warning("node.token_salt.no_seed_answered seeds=%s: taking salt 0 (random tokens)", ",".join(seeds))
    return 0
