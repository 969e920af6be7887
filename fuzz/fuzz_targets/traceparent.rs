//! `TraceContext::parse` on arbitrary text: never panics, and whatever it accepts
//! round-trips through `Display`.
#![no_main]

use cottontail::TraceContext;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(tc) = TraceContext::parse(&text) {
        assert_ne!(tc.trace_id, 0);
        assert_ne!(tc.span_id, 0);
        let canonical = tc.to_string();
        assert_eq!(TraceContext::parse(&canonical), Some(tc));
        assert_eq!(tc.trace_id_hex().len(), 32);
        assert_eq!(tc.span_id_hex().len(), 16);
        // A version-00 header is accepted only in its exact canonical form.
        if text.trim().starts_with("00-") {
            assert_eq!(canonical, text.trim());
        }
        let child = tc.child();
        assert_eq!(child.trace_id, tc.trace_id);
        assert_ne!(child.span_id, 0);
    }
});
