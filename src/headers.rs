//! Header names of the message contract and tolerant parsers for header values.
//!
//! Header values come from any AMQP client in any language, so every parser here accepts
//! every integer width and numeric strings, and returns `None` (never panics) on anything else.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Reply status: `ok`, `error` or `progress`.
pub const STATUS: &str = "x-status";
/// Human-readable reason a message was dead-lettered.
pub const ERROR: &str = "x-error";
/// Machine-readable kind of the error that dead-lettered a message.
pub const ERROR_KIND: &str = "x-error-kind";
/// Handler attempts already made for this message (set on retry and dead-letter copies).
pub const ATTEMPTS: &str = "x-attempts";
/// Name of the handler that dead-lettered the message.
pub const HANDLER: &str = "x-handler";
/// Ordering key of sequence-numbered messages.
pub const SEQUENCE_KEY: &str = "x-sequence-key";
/// Position of the message in its key's sequence (1, 2, 3…).
pub const SEQUENCE: &str = "x-sequence";
/// Set by quorum queues: how many times the message was returned to the queue.
pub const DELIVERY_COUNT: &str = "x-delivery-count";
/// Set by cottontail on classic queues: how many times the message was redelivered unsettled.
pub const REDELIVERIES: &str = "x-redeliveries";
/// When a held ordered message started waiting for its gap to fill (ms since the epoch).
pub const HELD_SINCE: &str = "x-held-since";
/// The last transient error, carried on retry copies for operators browsing retry queues.
pub const LAST_ERROR: &str = "x-last-error";
/// Stamped (value `error`) on the dead-letter copy of a request that had a `reply_to`: its
/// caller was sent its one final reply, the `error`, when it was dead-lettered. `dlq replay`
/// keeps it, and cottontail sends no reply at all (`progress`, `ok` or `error`) for a message
/// carrying it, so a replayed request never gives its caller a second final answer.
pub const REPLY_SENT: &str = "x-reply-sent";
/// Set by cottontail on a continuation (a handler returned [`Continue`](crate::Continue)):
/// the slices run so far (1 on the first continuation).
pub const CONTINUATION: &str = "x-continuation";
/// Header cottontail adds to a delivered message whose properties held invalid UTF-8; its
/// value names the fields (e.g. `message_id, header name`). Reserved: a message published with
/// it is dead-lettered the same way.
pub const INVALID_UTF8: &str = "x-invalid-utf8";

/// Workflow messages: the workflow's name.
pub const WORKFLOW: &str = "x-workflow";
/// Workflow messages: the workflow id (the entry message's `message_id`).
pub const WORKFLOW_ID: &str = "x-workflow-id";
/// Workflow messages: the step this message runs, or whose compensation it runs.
pub const WORKFLOW_STEP: &str = "x-workflow-step";
/// Workflow messages: the steps still to run after this one, in order (the itinerary).
pub const WORKFLOW_ITINERARY: &str = "x-workflow-itinerary";
/// Workflow messages: completed steps with a compensation, most recent first (the
/// compensation log); on a compensation message, those still to undo after this one.
pub const WORKFLOW_COMPENSATIONS: &str = "x-workflow-compensations";
/// Compensation messages: the steps undone so far, in the order they were undone.
pub const WORKFLOW_COMPENSATED: &str = "x-workflow-compensated";
/// Compensation messages: the steps whose compensation was dead-lettered.
pub const WORKFLOW_COMPENSATION_FAILED: &str = "x-workflow-compensation-failed";
/// Compensation messages: the step that failed.
pub const WORKFLOW_FAILED_STEP: &str = "x-workflow-failed-step";
/// Compensation messages: when a fan-out step failed, the index of its first failed child.
pub const WORKFLOW_FAILED_INDEX: &str = "x-workflow-failed-index";
/// Compensation messages: the failed step's error kind.
pub const WORKFLOW_ERROR_KIND: &str = "x-workflow-error-kind";
/// Compensation messages: the failed step's error message.
pub const WORKFLOW_ERROR: &str = "x-workflow-error";
/// Workflow messages: the original caller's `reply_to` (step messages have none of their
/// own, so that the pipeline never replies to the caller on a step's behalf).
pub const WORKFLOW_REPLY_TO: &str = "x-workflow-reply-to";
/// Workflow messages: the original caller's `correlation_id`.
pub const WORKFLOW_CORRELATION_ID: &str = "x-workflow-correlation-id";
/// Workflow messages: when the workflow started (ms since the epoch).
pub const WORKFLOW_STARTED: &str = "x-workflow-started";

/// Reads a header as a non-negative integer, whatever integer type or numeric string the
/// publisher used.
pub fn get_u64(headers: Option<&FieldTable>, name: &str) -> Option<u64> {
    let value = headers?.inner().get(name)?;
    value_as_u64(value)
}

/// A text header without copying it (`None` for numbers and other types).
pub fn get_str<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a str> {
    match headers?.inner().get(name)? {
        AMQPValue::ShortString(s) => Some(s.as_str()),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ByteArray(b) => std::str::from_utf8(b.as_slice()).ok(),
        _ => None,
    }
}

/// Reads a header as text (short or long string; numbers are rendered).
pub fn get_string(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    let value = headers?.inner().get(name)?;
    match value {
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned),
        AMQPValue::ByteArray(b) => std::str::from_utf8(b.as_slice()).ok().map(str::to_owned),
        other => value_as_i128(other).map(|n| n.to_string()),
    }
}

/// Converts an AMQP value to `u64` when it holds a non-negative integer.
pub fn value_as_u64(value: &AMQPValue) -> Option<u64> {
    value_as_i128(value).and_then(|n| u64::try_from(n).ok())
}

fn value_as_i128(value: &AMQPValue) -> Option<i128> {
    Some(match value {
        AMQPValue::ShortShortInt(n) => i128::from(*n),
        AMQPValue::ShortShortUInt(n) => i128::from(*n),
        AMQPValue::ShortInt(n) => i128::from(*n),
        AMQPValue::ShortUInt(n) => i128::from(*n),
        AMQPValue::LongInt(n) => i128::from(*n),
        AMQPValue::LongUInt(n) => i128::from(*n),
        AMQPValue::LongLongInt(n) => i128::from(*n),
        AMQPValue::Timestamp(n) => i128::from(*n),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok()?,
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()?
            .trim()
            .parse()
            .ok()?,
        _ => return None,
    })
}

/// Sets a string header.
pub fn set_string(table: &mut FieldTable, name: &str, value: impl Into<String>) {
    table.insert(
        ShortString::from(name),
        AMQPValue::LongString(LongString::from(value.into())),
    );
}

/// Sets an integer header (as a signed 64-bit value, which every client library reads).
pub fn set_int(table: &mut FieldTable, name: &str, value: u64) {
    let value = i64::try_from(value).unwrap_or(i64::MAX);
    table.insert(ShortString::from(name), AMQPValue::LongLongInt(value));
}

/// Reads a header holding a list of strings (an AMQP array); `None` when absent or when an
/// element is not a string.
pub fn get_strings(headers: Option<&FieldTable>, name: &str) -> Option<Vec<String>> {
    match headers?.inner().get(name)? {
        AMQPValue::FieldArray(items) => items
            .as_slice()
            .iter()
            .map(|item| match item {
                AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
                AMQPValue::LongString(s) => {
                    std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned)
                }
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// Sets a header holding a list of strings (an AMQP array of long strings).
pub fn set_strings(table: &mut FieldTable, name: &str, values: &[String]) {
    let items: Vec<AMQPValue> = values
        .iter()
        .map(|v| AMQPValue::LongString(LongString::from(v.as_str())))
        .collect();
    table.insert(ShortString::from(name), AMQPValue::FieldArray(items.into()));
}

/// A copy of `table` without the named headers.
pub fn without(table: Option<&FieldTable>, names: &[&str]) -> FieldTable {
    let mut out = FieldTable::default();
    if let Some(table) = table {
        for (k, v) in table {
            if !names.contains(&k.as_str()) {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_of_every_width_and_numeric_strings_parse() {
        let mut t = FieldTable::default();
        t.insert("a".into(), AMQPValue::ShortShortUInt(3));
        t.insert("b".into(), AMQPValue::LongInt(7));
        t.insert("c".into(), AMQPValue::LongString("12".into()));
        t.insert("d".into(), AMQPValue::LongInt(-1));
        t.insert("e".into(), AMQPValue::Boolean(true));
        t.insert("f".into(), AMQPValue::LongString(" x ".into()));
        assert_eq!(get_u64(Some(&t), "a"), Some(3));
        assert_eq!(get_u64(Some(&t), "b"), Some(7));
        assert_eq!(get_u64(Some(&t), "c"), Some(12));
        assert_eq!(get_u64(Some(&t), "d"), None);
        assert_eq!(get_u64(Some(&t), "e"), None);
        assert_eq!(get_u64(Some(&t), "f"), None);
        assert_eq!(get_u64(Some(&t), "missing"), None);
        assert_eq!(get_u64(None, "a"), None);
    }

    #[test]
    fn strings_read_from_any_string_type() {
        let mut t = FieldTable::default();
        set_string(&mut t, "s", "hello");
        t.insert("n".into(), AMQPValue::LongLongInt(42));
        t.insert("bad".into(), AMQPValue::LongString(vec![0xff, 0xfe].into()));
        assert_eq!(get_string(Some(&t), "s").as_deref(), Some("hello"));
        assert_eq!(get_string(Some(&t), "n").as_deref(), Some("42"));
        assert_eq!(get_string(Some(&t), "bad"), None);
    }

    #[test]
    fn string_lists_round_trip_and_reject_other_types() {
        let mut t = FieldTable::default();
        set_strings(&mut t, "l", &["a".to_owned(), "b".to_owned()]);
        set_strings(&mut t, "empty", &[]);
        t.insert("n".into(), AMQPValue::LongLongInt(1));
        t.insert(
            "mixed".into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongLongInt(1)].into()),
        );
        assert_eq!(
            get_strings(Some(&t), "l"),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(get_strings(Some(&t), "empty"), Some(vec![]));
        assert_eq!(get_strings(Some(&t), "n"), None);
        assert_eq!(get_strings(Some(&t), "mixed"), None);
    }
}
