"""Pure helpers: request messages -> start requests, and AWS errors -> retry/hold/dead-letter."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

from dispatcher.aws.api import ErrorKind, classify, is_retryable
from dispatcher.core.requests import (
    IDEMPOTENCY_ATTRIBUTE,
    MAX_INPUT_BYTES,
    REQUEST_ID_ATTRIBUTE,
    BadRequest,
    StartRequest,
    execution_arn,
    parse,
)
from dispatcher.settings.config import InputFormat
from tests.fakes import STATE_MACHINE_ARN, client_error, sqs_message

pytestmark = pytest.mark.timeout(10)

MESSAGE_ID = "0b5d7a8e-3c1f-4b6a-9d2e-7f8a9b0c1d2e"


def started(message: dict[str, object], fmt: InputFormat = InputFormat.JSON) -> StartRequest:
    """Parse a message that must be valid."""
    request = parse(message, fmt)
    assert isinstance(request, StartRequest), request
    return request


def refused(message: dict[str, object], fmt: InputFormat = InputFormat.JSON) -> BadRequest:
    """Parse a message that must be refused."""
    request = parse(message, fmt)
    assert isinstance(request, BadRequest), request
    return request


def test_valid_json_is_the_input_verbatim() -> None:
    body = '{"order": 42,  "items": ["a", "b"]}'  # odd spacing: must not be re-serialised
    request = started(sqs_message(body, message_id=MESSAGE_ID, receipt_handle="rh-1"))
    assert request.input == body
    assert request.message_id == MESSAGE_ID
    assert request.receipt_handle == "rh-1"


@pytest.mark.parametrize("body", ["", "{", "not json", "{'a': 1}", '{"a": 1} trailing'])
def test_invalid_json_is_refused(body: str) -> None:
    bad = refused(sqs_message(body, receipt_handle="rh-2"))
    assert bad.reason == "invalid_json"
    assert "not valid JSON" in bad.detail
    assert bad.receipt_handle == "rh-2"


def test_too_deeply_nested_json_is_refused() -> None:
    deep = "[" * 100_000 + "]" * 100_000  # 200 KB: under the size limit
    assert refused(sqs_message(deep)).reason == "invalid_json"


def body_of_size(size: int) -> str:
    """A JSON string literal of exactly ``size`` UTF-8 bytes."""
    return json.dumps("a" * (size - 2))


def test_input_of_exactly_256_kib_is_accepted() -> None:
    body = body_of_size(MAX_INPUT_BYTES)
    assert len(body.encode()) == 256 * 1024
    assert started(sqs_message(body)).input == body


def test_input_one_byte_over_256_kib_is_refused() -> None:
    bad = refused(sqs_message(body_of_size(MAX_INPUT_BYTES + 1)))
    assert bad.reason == "input_too_large"
    assert "262145 bytes" in bad.detail


def test_size_is_counted_in_utf8_bytes_not_characters() -> None:
    body = json.dumps("é" * (MAX_INPUT_BYTES // 2), ensure_ascii=False)  # 2 bytes each
    assert len(body) < MAX_INPUT_BYTES < len(body.encode())
    assert refused(sqs_message(body)).reason == "input_too_large"


@pytest.mark.parametrize("key", ["a", "order-42_retry", "A" * 80, "0123456789"])
def test_valid_idempotency_key_is_the_name(key: str) -> None:
    request = started(sqs_message(attributes={IDEMPOTENCY_ATTRIBUTE: key}, message_id=MESSAGE_ID))
    assert request.name == key


@pytest.mark.parametrize(
    "key", ["", "A" * 81, "order 42", "ordér", "order/42", "order.42", "注文", "a:b"]
)
def test_invalid_idempotency_key_is_refused_not_replaced(key: str) -> None:
    bad = refused(sqs_message(attributes={IDEMPOTENCY_ATTRIBUTE: key}, message_id=MESSAGE_ID))
    assert bad.reason == "invalid_idempotency_key"
    assert IDEMPOTENCY_ATTRIBUTE in bad.detail
    assert "1-80 characters" in bad.detail


def test_idempotency_key_without_a_string_value_is_refused() -> None:
    message = sqs_message(message_id=MESSAGE_ID)
    message["MessageAttributes"] = {
        IDEMPOTENCY_ATTRIBUTE: {"DataType": "Binary", "BinaryValue": b"k"}
    }
    assert refused(message).reason == "invalid_idempotency_key"


def test_idempotency_key_with_a_trailing_newline_is_refused() -> None:
    bad = refused(sqs_message(attributes={IDEMPOTENCY_ATTRIBUTE: "order-42\n"}))
    assert bad.reason == "invalid_idempotency_key"


def test_long_invalid_key_is_shortened_in_the_detail() -> None:
    bad = refused(sqs_message(attributes={IDEMPOTENCY_ATTRIBUTE: "x" * 5000}))
    assert len(bad.detail) < 300


def test_name_falls_back_to_the_message_id() -> None:
    assert started(sqs_message(message_id=MESSAGE_ID)).name == MESSAGE_ID


def test_message_id_that_is_no_valid_name_is_refused() -> None:
    bad = refused(sqs_message(message_id="id with spaces"))
    assert bad.reason == "invalid_idempotency_key"
    assert "message id" in bad.detail


def test_redelivery_maps_to_the_same_name() -> None:
    first = started(sqs_message(message_id=MESSAGE_ID, receipt_handle="rh-a"))
    again = started(sqs_message(message_id=MESSAGE_ID, receipt_handle="rh-b"))
    assert first.name == again.name
    assert first.receipt_handle != again.receipt_handle


def test_envelope_wraps_a_plain_text_body_and_its_attributes() -> None:
    message = sqs_message(
        "plain text, not JSON",
        message_id=MESSAGE_ID,
        attributes={"customer": "c-1", IDEMPOTENCY_ATTRIBUTE: "k-1"},
    )
    message["MessageAttributes"]["blob"] = {"DataType": "Binary", "BinaryValue": b"\x00"}
    request = started(message, InputFormat.ENVELOPE)
    assert request.name == "k-1"
    assert json.loads(request.input) == {
        "body": "plain text, not JSON",
        "requestId": "k-1",
        "attributes": {"customer": "c-1", IDEMPOTENCY_ATTRIBUTE: "k-1"},
    }


def test_envelope_is_the_same_for_a_producers_retry_and_for_every_copy() -> None:
    """Same key, body and attributes sent twice (new message id, attributes in another
    order, the parent's new task token), a dead-letter copy (dispatcher-* attributes), a
    redrive (new id, request id kept): one input, so no idempotency conflict."""
    body, attrs = "plain text", {IDEMPOTENCY_ATTRIBUTE: "k-1", "customer": "c-1"}
    first = sqs_message(body, message_id=MESSAGE_ID, attributes={**attrs, "task-token": "t1"})
    retry = sqs_message(
        body, message_id="retry-id", attributes={"customer": "c-1", **attrs, "task-token": "t2"}
    )
    copy = sqs_message(
        body,
        message_id="copy-id",
        attributes={
            **attrs,
            REQUEST_ID_ATTRIBUTE: "k-1",
            "dispatcher-reason": "invalid_json",
            "dispatcher-original-message-id": MESSAGE_ID,
        },
    )
    inputs = {started(m, InputFormat.ENVELOPE).input for m in (first, retry, copy)}
    assert len(inputs) == 1
    [document] = [json.loads(i) for i in inputs]
    assert document["attributes"] == attrs
    plain = sqs_message(body, message_id=MESSAGE_ID)
    redriven = sqs_message(body, message_id="new-id", attributes={REQUEST_ID_ATTRIBUTE: MESSAGE_ID})
    assert (
        started(plain, InputFormat.ENVELOPE).input == started(redriven, InputFormat.ENVELOPE).input
    )


def test_every_copy_of_a_request_maps_to_its_name() -> None:
    """A copy (dead letter, redrive, SQS move task) has a new message id but carries the
    request's identity: the same name as the original."""
    original = started(sqs_message(message_id=MESSAGE_ID))
    copy = started(sqs_message(message_id="copy-id", attributes={REQUEST_ID_ATTRIBUTE: MESSAGE_ID}))
    assert original.name == copy.name == copy.identity == MESSAGE_ID
    keyed = sqs_message(
        message_id="copy-id",
        attributes={REQUEST_ID_ATTRIBUTE: "order-1", IDEMPOTENCY_ATTRIBUTE: "order-1"},
    )
    assert started(keyed).name == "order-1"


@pytest.mark.parametrize("value", ["", "A" * 81, "a b", "x\n"])
def test_an_invalid_request_id_is_refused_not_replaced(value: str) -> None:
    bad = refused(sqs_message(message_id=MESSAGE_ID, attributes={REQUEST_ID_ATTRIBUTE: value}))
    assert bad.reason == "invalid_idempotency_key"
    assert REQUEST_ID_ATTRIBUTE in bad.detail


def test_envelope_size_limit_counts_the_wrapped_input() -> None:
    body = "a" * (MAX_INPUT_BYTES - 10)  # fits alone, not once wrapped
    assert refused(sqs_message(body), InputFormat.ENVELOPE).reason == "input_too_large"


def test_system_attributes_are_carried() -> None:
    trace = "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1"
    message = sqs_message(
        system={
            "SentTimestamp": "1700000000123",
            "AWSTraceHeader": trace,
            "ApproximateReceiveCount": "4",
        }
    )
    request = started(message)
    assert request.sent_at == pytest.approx(1_700_000_000.123)
    assert request.trace_header == trace
    assert request.receive_count == 4


def test_missing_system_attributes_have_defaults() -> None:
    message = sqs_message()
    del message["Attributes"]
    request = started(message)
    assert request.sent_at is None
    assert request.trace_header is None
    assert request.receive_count == 1


def test_execution_arn_is_derived_from_the_state_machine_arn() -> None:
    assert execution_arn(STATE_MACHINE_ARN, "order-42") == (
        "arn:aws:states:eu-west-1:123456789012:execution:governed:order-42"
    )
    gov = "arn:aws-us-gov:states:us-gov-west-1:123456789012:stateMachine:stateMachine"
    assert execution_arn(gov, "n") == (
        "arn:aws-us-gov:states:us-gov-west-1:123456789012:execution:stateMachine:n"
    )


# -- error sorting -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (client_error("ThrottlingException", 400), ErrorKind.TRANSIENT),
        (client_error("TooManyRequestsException", 400), ErrorKind.TRANSIENT),
        (client_error("RequestLimitExceeded", 400), ErrorKind.TRANSIENT),
        (client_error("SomethingNew", 429), ErrorKind.TRANSIENT),
        (client_error("InternalServerError", 500), ErrorKind.TRANSIENT),
        (client_error("SomethingNew", 502), ErrorKind.TRANSIENT),
        (client_error("ServiceUnavailable", 503), ErrorKind.TRANSIENT),
        (client_error("ExecutionLimitExceeded", 400), ErrorKind.TRANSIENT),
        (EndpointConnectionError(endpoint_url="https://states"), ErrorKind.TRANSIENT),
        (ConnectTimeoutError(endpoint_url="https://states"), ErrorKind.TRANSIENT),
        (ReadTimeoutError(endpoint_url="https://states"), ErrorKind.TRANSIENT),
        (ConnectionResetError(), ErrorKind.TRANSIENT),
        (TimeoutError(), ErrorKind.TRANSIENT),
        (client_error("AccessDeniedException", 400), ErrorKind.SETUP),
        (client_error("StateMachineDoesNotExist", 400), ErrorKind.SETUP),
        (client_error("ExpiredTokenException", 400), ErrorKind.SETUP),
        (client_error("SomethingNew", 403), ErrorKind.SETUP),
        (client_error("InvalidExecutionInput", 400), ErrorKind.PERMANENT),
        (client_error("ValidationException", 400), ErrorKind.PERMANENT),
        (client_error("InvalidName", 400), ErrorKind.PERMANENT),
        (client_error("ExecutionAlreadyExists", 400), ErrorKind.PERMANENT),
        (ValueError("bug"), ErrorKind.UNKNOWN),  # a defect here, never the request's
    ],
)
def test_classify(error: Exception, kind: ErrorKind) -> None:
    assert classify(error) is kind
    aws = not isinstance(error, ValueError)  # anything else is not retried: a defect
    assert is_retryable(error) is (aws and kind is not ErrorKind.PERMANENT)
