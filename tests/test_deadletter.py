"""The dead-letter copy: what SQS counts against a queue's size, and what fits (pure)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from dispatcher.daemon.deadletter import (
    DETAIL_ATTRIBUTE,
    MAX_ATTRIBUTES,
    ORIGINAL_ID_ATTRIBUTE,
    REASON_ATTRIBUTE,
    REQUEST_ID_ATTRIBUTE,
    attribute_size,
    fitted_attributes,
    message_size,
)
from tests.fakes import sqs_message

MAX = 262_144
MESSAGE_ID = "6f0c1f43-6d55-4f73-a3d8-8c2f5a1d9e01"
OURS = (REASON_ATTRIBUTE, REQUEST_ID_ATTRIBUTE, ORIGINAL_ID_ATTRIBUTE)


def string(value: str) -> dict[str, Any]:
    """A String message attribute."""
    return {"DataType": "String", "StringValue": value}


def test_sqs_counts_the_body_and_each_attributes_name_type_and_value() -> None:
    attributes = {
        "tenant": string("é"),  # 2 bytes in UTF-8
        "blob": {"DataType": "Binary", "BinaryValue": b"\x00\x01\x02"},
        "n": {"DataType": "Number.int", "StringValue": "42"},
    }
    assert attribute_size("tenant", attributes["tenant"]) == 6 + 6 + 2
    assert message_size("ab", attributes) == 2 + (6 + 6 + 2) + (4 + 6 + 3) + (1 + 10 + 2)


def test_with_room_everything_goes_the_detail_cut_at_1000_characters() -> None:
    message = sqs_message("{}", message_id=MESSAGE_ID, attributes={"tenant": "t-1"})
    fitted = fitted_attributes(message, "invalid_json", "d" * 5_000, MAX)
    assert fitted == {
        REASON_ATTRIBUTE: string("invalid_json"),
        REQUEST_ID_ATTRIBUTE: string(MESSAGE_ID),
        ORIGINAL_ID_ATTRIBUTE: string(MESSAGE_ID),
        "tenant": string("t-1"),
        DETAIL_ATTRIBUTE: string("d" * 1_000),
    }


def test_at_most_ten_attributes_ours_first_and_one_kept_for_the_detail() -> None:
    many = {f"a{i:02}": f"v{i}" for i in range(12)}
    message = sqs_message("{}", message_id=MESSAGE_ID, attributes=many)
    fitted = fitted_attributes(message, "invalid_json", "why", MAX)
    assert len(fitted) == MAX_ATTRIBUTES
    assert list(fitted)[:3] == list(OURS)
    assert [name for name in fitted if name.startswith("a")] == [f"a{i:02}" for i in range(6)]
    assert fitted[DETAIL_ATTRIBUTE] == string("why")


def test_an_earlier_reason_on_the_request_is_replaced_not_copied() -> None:
    message = sqs_message("{}", attributes={REASON_ATTRIBUTE: "old", DETAIL_ATTRIBUTE: "old"})
    fitted = fitted_attributes(message, "unknown_pool", "new", MAX)
    assert fitted[REASON_ATTRIBUTE] == string("unknown_pool")
    assert fitted[DETAIL_ATTRIBUTE] == string("new")


def test_near_the_limit_the_detail_goes_first_then_the_copied_attributes() -> None:
    message = sqs_message("{}", message_id=MESSAGE_ID, attributes={"tenant": "t-1"})
    needed = message_size(
        message["Body"],
        {
            REASON_ATTRIBUTE: string("invalid_json"),
            REQUEST_ID_ATTRIBUTE: string(MESSAGE_ID),
            ORIGINAL_ID_ATTRIBUTE: string(MESSAGE_ID),
            "tenant": string("t-1"),
        },
    )
    detail_overhead = attribute_size(DETAIL_ATTRIBUTE, string(""))
    fitted = fitted_attributes(message, "invalid_json", "0123456789", needed + detail_overhead + 4)
    assert fitted[DETAIL_ATTRIBUTE] == string("0123")
    assert "tenant" in fitted
    fitted = fitted_attributes(message, "invalid_json", "0123456789", needed)
    assert set(fitted) == {*OURS, "tenant"}, "no room for even one character of detail"
    fitted = fitted_attributes(message, "invalid_json", "0123456789", needed - 1)
    assert set(fitted) == set(OURS), "the copied attribute no longer fits"


def test_the_detail_is_cut_between_characters_never_inside_one() -> None:
    message = sqs_message("{}", message_id=MESSAGE_ID)
    base = message_size(
        "{}",
        {
            REASON_ATTRIBUTE: string("r"),
            REQUEST_ID_ATTRIBUTE: string(MESSAGE_ID),
            ORIGINAL_ID_ATTRIBUTE: string(MESSAGE_ID),
        },
    )
    overhead = attribute_size(DETAIL_ATTRIBUTE, string(""))
    fitted = fitted_attributes(message, "r", "ééé", base + overhead + 3)  # 1.5 characters
    assert fitted[DETAIL_ATTRIBUTE] == string("é")


def test_a_body_over_the_limit_by_itself_gets_everything_sqs_decides() -> None:
    message = sqs_message("x" * (MAX + 1), message_id=MESSAGE_ID, attributes={"tenant": "t"})
    fitted = fitted_attributes(message, "input_too_large", "too big", MAX)
    assert set(fitted) == {*OURS, "tenant", DETAIL_ATTRIBUTE}


@given(
    spare=st.integers(min_value=0, max_value=3_000),
    attributes=st.dictionaries(
        st.text("abcdefghij-", min_size=1, max_size=20),
        st.text(min_size=1, max_size=300),
        max_size=12,
    ),
    detail=st.text(max_size=1_500),
    maximum=st.sampled_from([1_024, 262_144, 1_048_576]),
)
def test_the_copy_always_fits_and_keeps_the_reason_when_it_can(
    spare: int, attributes: dict[str, str], detail: str, maximum: int
) -> None:
    body = "b" * max(1, maximum - spare)
    message = sqs_message(body, message_id=MESSAGE_ID, attributes=attributes)
    fitted = fitted_attributes(message, "InvalidExecutionInput", detail, maximum)
    assert message_size(body, fitted) <= maximum
    assert len(fitted) <= MAX_ATTRIBUTES
    required = {
        REASON_ATTRIBUTE: string("InvalidExecutionInput"),
        REQUEST_ID_ATTRIBUTE: string(MESSAGE_ID),
        ORIGINAL_ID_ATTRIBUTE: string(MESSAGE_ID),
    }
    if message_size(body, required) <= maximum:
        assert {name: fitted[name] for name in required} == required
    for name, value in fitted.items():
        if name not in (*OURS, DETAIL_ATTRIBUTE):
            assert value == string(attributes[name]), "copied whole, never cut"


def test_the_copy_carries_the_requests_identity_whatever_copy_it_is() -> None:
    """The key when there is one, else the message id; a copy of a copy keeps the identity
    it carries (not its own new message id), and no earlier dispatcher-* attribute."""
    keyed = sqs_message("{}", message_id=MESSAGE_ID, attributes={"idempotency-key": "order-1"})
    assert fitted_attributes(keyed, "r", "d", MAX)[REQUEST_ID_ATTRIBUTE] == string("order-1")
    copy = sqs_message(
        "{}",
        message_id="a-new-id-for-the-copy",
        attributes={REQUEST_ID_ATTRIBUTE: MESSAGE_ID, REASON_ATTRIBUTE: "old", "tenant": "t"},
    )
    fitted = fitted_attributes(copy, "invalid_json", "d", MAX)
    assert fitted[REQUEST_ID_ATTRIBUTE] == string(MESSAGE_ID)
    assert fitted[ORIGINAL_ID_ATTRIBUTE] == string("a-new-id-for-the-copy")
    assert set(fitted) == {*OURS, "tenant", DETAIL_ATTRIBUTE}
    invalid = sqs_message("{}", attributes={"idempotency-key": "not valid"})
    assert REQUEST_ID_ATTRIBUTE not in fitted_attributes(
        invalid, "invalid_idempotency_key", "", MAX
    )
