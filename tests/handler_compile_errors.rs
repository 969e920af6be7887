//! A handler that does not fit is reported by the rule it breaks, not as an opaque
//! "`Handler<_, _>` is not satisfied": the messages are locked here (explained in
//! `docs/handlers-that-do-not-compile.md`). Regenerate after an intended change with
//! `TRYBUILD=overwrite cargo test --test handler_compile_errors`.

#[test]
fn unfit_handlers_name_the_rule_they_break() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
