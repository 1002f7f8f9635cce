"""SQS's own redrive: ``StartMessageMoveTask`` from a dead-letter queue to a destination
queue, as AWS documents it.

The task moves the messages the source held when it started (its
``ApproximateNumberOfMessagesToMove``), at most ``rate`` a second, each as a new message on
the destination: the same body and every message attribute (the dispatcher's
``dispatcher-*`` ones included), a new message id, a receive count of zero. A message in
flight when its turn comes (someone received it) is not moved. It is server-side: no
client call, no fault, and it cannot be killed half-way through one message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from sim.sqs_model import flat

if TYPE_CHECKING:
    from sim.aws import World

NODE = "move-task"


async def move_task(world: World, source_url: str, target_url: str, *, rate: float = 10.0) -> int:
    """Run one move task to its end; returns how many messages it moved."""
    sqs, history, clock = world.sqs, world.history, world.clock
    source, target = sqs.queues[source_url], sqs.queues[target_url]
    world.sfn.advance()
    snapshot = [m.serial for m in source.messages.values() if m.visible(clock())]
    history.note(clock(), NODE, f"StartMessageMoveTask: {len(snapshot)} to move")
    moved = 0
    for serial in snapshot:
        await anyio.sleep(1.0 / rate)
        message = source.messages.get(serial)
        if message is None or not message.visible(clock()):
            continue
        message.deleted = True
        del source.messages[serial]
        new_id, _ = sqs.store(target, message.body, message.attributes, sender=NODE)
        history.message_sent(
            clock(),
            NODE,
            queue_url=target_url,
            message_id=new_id,
            body=message.body,
            attributes=flat(message.attributes),
        )
        history.note(clock(), NODE, f"{message.message_id} moved back as {new_id}")
        moved += 1
    history.note(clock(), NODE, f"move task done: {moved} moved")
    return moved
