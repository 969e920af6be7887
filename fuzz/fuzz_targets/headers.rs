//! Raw AMQP content-header property bytes (as they arrive in a frame) and raw field tables,
//! parsed by lapin and read through every cottontail header accessor, the way
//! `Message::new` and the pipeline guards do.
#![no_main]

use cottontail::headers::{self, get_string, get_u64};
use cottontail::lapin::protocol::basic::parse_properties;
use cottontail::lapin::types::parsing::parse_field_table;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, table)) = parse_field_table(data) {
        cottontail_fuzz::walk(&table, &mut cottontail_fuzz::read_all);
    }
    if let Ok((_, properties)) = parse_properties(data) {
        let table = properties.headers().as_ref();
        if let Some(t) = table {
            cottontail_fuzz::walk(t, &mut cottontail_fuzz::read_all);
        }
        // What Message::new derives from the headers.
        let prior = get_u64(table, headers::ATTEMPTS).unwrap_or(0);
        let attempt = u32::try_from(prior.saturating_add(1)).unwrap_or(u32::MAX);
        assert!(attempt >= 1);
        let _ = get_string(table, cottontail::ops::TRACEPARENT)
            .and_then(|v| cottontail::TraceContext::parse(&v))
            .map_or_else(cottontail::TraceContext::new_root, |p| p.child());
        let _ = get_u64(table, headers::DELIVERY_COUNT);
        let _ = get_u64(table, headers::REDELIVERIES);
    }
});
