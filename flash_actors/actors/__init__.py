"""The actor core: mailboxes, actors, supervision and the actor system."""

from __future__ import annotations

from flash_actors.actors.actor import (
    Actor as Actor,
    ActorRef as ActorRef,
    ActorStatistics as ActorStatistics,
    Forward as Forward,
)
from flash_actors.actors.mailbox import (
    Envelope as Envelope,
    Mailbox as Mailbox,
    MailboxStatistics as MailboxStatistics,
    Reply as Reply,
)
from flash_actors.actors.supervision import RestartPolicy as RestartPolicy
from flash_actors.actors.system import ActorSystem as ActorSystem

__all__ = [
    "Actor",
    "ActorRef",
    "ActorStatistics",
    "ActorSystem",
    "Envelope",
    "Forward",
    "Mailbox",
    "MailboxStatistics",
    "Reply",
    "RestartPolicy",
]
