//! Shared helpers of the fuzz targets.

use cottontail::lapin::types::{AMQPValue, FieldTable};

/// Header names cottontail reads from deliveries.
pub const NAMES: &[&str] = &[
    cottontail::headers::STATUS,
    cottontail::headers::ERROR,
    cottontail::headers::ERROR_KIND,
    cottontail::headers::ATTEMPTS,
    cottontail::headers::HANDLER,
    cottontail::headers::SEQUENCE_KEY,
    cottontail::headers::SEQUENCE,
    cottontail::headers::DELIVERY_COUNT,
    cottontail::headers::REDELIVERIES,
    cottontail::headers::HELD_SINCE,
    cottontail::headers::LAST_ERROR,
    cottontail::ops::TRACEPARENT,
];

/// Every header table reachable from `table` (nested tables and arrays included).
pub fn walk(table: &FieldTable, f: &mut dyn FnMut(&FieldTable)) {
    f(table);
    for (_, value) in table {
        walk_value(value, f);
    }
}

fn walk_value(value: &AMQPValue, f: &mut dyn FnMut(&FieldTable)) {
    match value {
        AMQPValue::FieldTable(t) => walk(t, f),
        AMQPValue::FieldArray(a) => {
            for v in a.as_slice() {
                walk_value(v, f);
            }
        }
        other => {
            let _ = cottontail::headers::value_as_u64(other);
        }
    }
}

/// Runs every cottontail header reader on `table` (under its own keys and the framework's
/// names), checking the readers agree with each other.
pub fn read_all(table: &FieldTable) {
    use cottontail::headers::{get_string, get_u64, value_as_u64, without};
    let keys: Vec<String> = table
        .inner()
        .keys()
        .map(|k| k.as_str().to_owned())
        .collect();
    for name in keys.iter().map(String::as_str).chain(NAMES.iter().copied()) {
        let n = get_u64(Some(table), name);
        let s = get_string(Some(table), name);
        if let Some(value) = table.inner().get(name) {
            assert_eq!(n, value_as_u64(value));
            // A plain non-negative integer always renders as its decimal text.
            let int = matches!(
                value,
                AMQPValue::ShortShortInt(_)
                    | AMQPValue::ShortShortUInt(_)
                    | AMQPValue::ShortInt(_)
                    | AMQPValue::ShortUInt(_)
                    | AMQPValue::LongInt(_)
                    | AMQPValue::LongUInt(_)
                    | AMQPValue::LongLongInt(_)
                    | AMQPValue::Timestamp(_)
            );
            if let (true, Some(n)) = (int, n) {
                assert_eq!(s.as_deref(), Some(n.to_string().as_str()));
            }
        } else {
            assert!(n.is_none() && s.is_none());
        }
        if let Some(tp) = s.as_deref() {
            let _ = cottontail::TraceContext::parse(tp);
        }
    }
    let stripped = without(Some(table), NAMES);
    for name in NAMES {
        assert!(stripped.inner().get(*name).is_none());
    }
    assert!(stripped.inner().len() <= table.inner().len());
}
