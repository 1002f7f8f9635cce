"""The simulated SQS client, as ``session.client("sqs")``: botocore's names and checks."""

# ruff: noqa: N803 - the client takes botocore's keyword names (QueueUrl, ReceiptHandle)
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sim.calls import Answer
from sim.clients import (
    Client,
    check_attributes,
    check_entries,
    check_types,
    given,
    now_apply,
)
from sim.history import short


class SQSClient(Client):
    """SQS, as ``session.client("sqs")``."""

    service = "sqs"
    host = "sqs"

    async def send_message(
        self,
        *,
        QueueUrl: str,
        MessageBody: str,
        DelaySeconds: int | None = None,
        MessageAttributes: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Answer:
        """SendMessage."""
        params = given(
            QueueUrl=QueueUrl,
            MessageBody=MessageBody,
            DelaySeconds=DelaySeconds,
            MessageAttributes=MessageAttributes,
        )
        check_types(params, {"QueueUrl": str, "MessageBody": str, "DelaySeconds": int})
        check_attributes("MessageAttributes", MessageAttributes)
        sqs = self._world.sqs
        return await self._call(
            "SendMessage",
            params,
            now_apply(
                lambda: sqs.send_message(
                    self.node, QueueUrl, MessageBody, MessageAttributes, DelaySeconds or 0
                )
            ),
            f"to {short(QueueUrl)}",
        )

    async def send_message_batch(
        self, *, QueueUrl: str, Entries: list[Mapping[str, Any]]
    ) -> Answer:
        """SendMessageBatch."""
        params = given(QueueUrl=QueueUrl, Entries=Entries)
        check_types(params, {"QueueUrl": str})
        entries = check_entries(
            "Entries",
            Entries,
            ("Id", "MessageBody"),
            ("DelaySeconds", "MessageAttributes", "MessageSystemAttributes"),
        )
        for i, entry in enumerate(entries):
            check_attributes(f"Entries[{i}].MessageAttributes", entry.get("MessageAttributes"))
        sqs = self._world.sqs
        return await self._call(
            "SendMessageBatch",
            params,
            now_apply(lambda: sqs.send_message_batch(self.node, QueueUrl, entries)),
            f"to {short(QueueUrl)} x{len(entries)}",
        )

    async def receive_message(
        self,
        *,
        QueueUrl: str,
        AttributeNames: list[str] | None = None,
        MessageSystemAttributeNames: list[str] | None = None,
        MessageAttributeNames: list[str] | None = None,
        MaxNumberOfMessages: int | None = None,
        VisibilityTimeout: int | None = None,
        WaitTimeSeconds: int | None = None,
        ReceiveRequestAttemptId: str | None = None,
    ) -> Answer:
        """ReceiveMessage (long poll when ``WaitTimeSeconds`` > 0)."""
        params = given(
            QueueUrl=QueueUrl,
            AttributeNames=AttributeNames,
            MessageSystemAttributeNames=MessageSystemAttributeNames,
            MessageAttributeNames=MessageAttributeNames,
            MaxNumberOfMessages=MaxNumberOfMessages,
            VisibilityTimeout=VisibilityTimeout,
            WaitTimeSeconds=WaitTimeSeconds,
            ReceiveRequestAttemptId=ReceiveRequestAttemptId,
        )
        check_types(
            params,
            {
                "QueueUrl": str,
                "AttributeNames": list,
                "MessageSystemAttributeNames": list,
                "MessageAttributeNames": list,
                "MaxNumberOfMessages": int,
                "VisibilityTimeout": int,
                "WaitTimeSeconds": int,
            },
        )
        sqs, node = self._world.sqs, self.node
        system = [*(AttributeNames or []), *(MessageSystemAttributeNames or [])]
        count = 1 if MaxNumberOfMessages is None else MaxNumberOfMessages
        wait = WaitTimeSeconds or 0

        async def apply(deadline: float) -> Answer:
            return await sqs.receive_message(
                node,
                QueueUrl,
                count,
                wait,
                visibility=VisibilityTimeout,
                attribute_names=MessageAttributeNames or [],
                system_names=system,
                deadline=deadline,
            )

        return await self._call(
            "ReceiveMessage", params, apply, f"from {short(QueueUrl)} max={count} wait={wait}"
        )

    async def delete_message(self, *, QueueUrl: str, ReceiptHandle: str) -> Answer:
        """DeleteMessage."""
        params = given(QueueUrl=QueueUrl, ReceiptHandle=ReceiptHandle)
        check_types(params, {"QueueUrl": str, "ReceiptHandle": str})
        sqs = self._world.sqs
        return await self._call(
            "DeleteMessage",
            params,
            now_apply(lambda: sqs.delete_message(self.node, QueueUrl, ReceiptHandle)),
            f"on {short(QueueUrl)}",
        )

    async def delete_message_batch(
        self, *, QueueUrl: str, Entries: list[Mapping[str, Any]]
    ) -> Answer:
        """DeleteMessageBatch."""
        params = given(QueueUrl=QueueUrl, Entries=Entries)
        check_types(params, {"QueueUrl": str})
        entries = check_entries("Entries", Entries, ("Id", "ReceiptHandle"))
        sqs = self._world.sqs
        return await self._call(
            "DeleteMessageBatch",
            params,
            now_apply(lambda: sqs.delete_message_batch(self.node, QueueUrl, entries)),
            f"on {short(QueueUrl)} x{len(entries)}",
        )

    async def change_message_visibility(
        self, *, QueueUrl: str, ReceiptHandle: str, VisibilityTimeout: int
    ) -> Answer:
        """ChangeMessageVisibility."""
        params = given(
            QueueUrl=QueueUrl, ReceiptHandle=ReceiptHandle, VisibilityTimeout=VisibilityTimeout
        )
        check_types(params, {"QueueUrl": str, "ReceiptHandle": str, "VisibilityTimeout": int})
        sqs = self._world.sqs
        return await self._call(
            "ChangeMessageVisibility",
            params,
            now_apply(
                lambda: sqs.change_visibility(self.node, QueueUrl, ReceiptHandle, VisibilityTimeout)
            ),
            f"on {short(QueueUrl)} to {VisibilityTimeout}s",
        )

    async def change_message_visibility_batch(
        self, *, QueueUrl: str, Entries: list[Mapping[str, Any]]
    ) -> Answer:
        """ChangeMessageVisibilityBatch."""
        params = given(QueueUrl=QueueUrl, Entries=Entries)
        check_types(params, {"QueueUrl": str})
        entries = check_entries("Entries", Entries, ("Id", "ReceiptHandle"), ("VisibilityTimeout",))
        sqs = self._world.sqs
        return await self._call(
            "ChangeMessageVisibilityBatch",
            params,
            now_apply(lambda: sqs.change_visibility_batch(self.node, QueueUrl, entries)),
            f"on {short(QueueUrl)} x{len(entries)}",
        )

    async def get_queue_attributes(
        self, *, QueueUrl: str, AttributeNames: list[str] | None = None
    ) -> Answer:
        """GetQueueAttributes."""
        params = given(QueueUrl=QueueUrl, AttributeNames=AttributeNames)
        check_types(params, {"QueueUrl": str, "AttributeNames": list})
        sqs = self._world.sqs
        return await self._call(
            "GetQueueAttributes",
            params,
            now_apply(lambda: sqs.get_queue_attributes(QueueUrl, AttributeNames or [])),
            short(QueueUrl),
        )

    async def get_queue_url(
        self, *, QueueName: str, QueueOwnerAWSAccountId: str | None = None
    ) -> Answer:
        """GetQueueUrl."""
        params = given(QueueName=QueueName, QueueOwnerAWSAccountId=QueueOwnerAWSAccountId)
        check_types(params, {"QueueName": str})
        sqs = self._world.sqs

        def step() -> Answer:
            for url, queue in sqs.queues.items():
                if queue.name == QueueName:
                    return {"QueueUrl": url}
            return {"QueueUrl": sqs.queue(f"/{QueueName}", "GetQueueUrl").url}

        return await self._call("GetQueueUrl", params, now_apply(step), QueueName)
