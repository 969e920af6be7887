//! The `Sequence` extractor's header reading (`x-sequence-key`, `x-sequence`) on wire-parsed
//! tables, and the producer side: `sequence_headers` → wire bytes → lapin parser → readers
//! gives back the same key and number; `partition_of` stays in range.
#![no_main]

use cottontail::headers::{self, get_string, get_u64};
use cottontail::lapin::types::generation::gen_field_table;
use cottontail::lapin::types::parsing::parse_field_table;
use cottontail::lapin::types::FieldTable;
use libfuzzer_sys::fuzz_target;

/// Exactly what `impl FromMessage for Sequence` does with the headers.
fn extract(table: Option<&FieldTable>) -> Option<(String, u64)> {
    let key = get_string(table, headers::SEQUENCE_KEY).filter(|k| !k.is_empty())?;
    let number = get_u64(table, headers::SEQUENCE).filter(|n| *n >= 1)?;
    Some((key, number))
}

fuzz_target!(|data: &[u8]| {
    if let Ok((_, table)) = parse_field_table(data) {
        if let Some((key, _)) = extract(Some(&table)) {
            for partitions in [0u16, 1, 7, u16::MAX] {
                assert!(cottontail::names::partition_of(&key, partitions) < partitions.max(1));
            }
        }
    }
    // Producer round trip: first 8 bytes the number, the rest the key.
    if data.len() >= 8 {
        let number = u64::from_le_bytes(data[..8].try_into().unwrap());
        let key = String::from_utf8_lossy(&data[8..]).into_owned();
        let table = cottontail::client::sequence_headers(&key, number);
        let (wire, _) =
            cookie_factory::r#gen(gen_field_table(&table), Vec::new()).expect("serialize headers");
        let (_, parsed) = parse_field_table(wire.as_slice()).expect("own headers parse back");
        let got = extract(Some(&parsed));
        let expected_number = number.min(i64::MAX as u64);
        if !key.is_empty() && number >= 1 {
            assert_eq!(got, Some((key, expected_number)));
        } else {
            assert_eq!(got, None);
        }
    }
});
