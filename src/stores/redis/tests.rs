use super::*;

#[test]
fn claim_answers_are_parsed_without_trusting_them() {
    let v = |parts: &[&[u8]]| parts.iter().map(|p| p.to_vec()).collect::<Vec<_>>();
    assert_eq!(parse_claim(v(&[b"acquired"])), Ok(Claim::Acquired));
    assert_eq!(parse_claim(v(&[b"busy"])), Ok(Claim::Busy));
    assert_eq!(parse_claim(v(&[b"done"])), Ok(Claim::Done { reply: None }));
    assert_eq!(
        parse_claim(v(&[b"done", b""])),
        Ok(Claim::Done {
            reply: Some(Vec::new())
        })
    );
    assert!(parse_claim(v(&[b"corrupt"])).is_err());
    assert!(parse_claim(Vec::new()).is_err());
}

#[test]
fn values_distinguish_no_reply_from_an_empty_one() {
    assert_eq!(done_value(None), b"done0:");
    assert_eq!(done_value(Some(Vec::new())), b"done1:");
    assert_eq!(done_value(Some(b"{}".to_vec())), b"done1:{}");
    assert_eq!(claim_value("i/1"), b"claim:i/1");
}

#[test]
fn keys_keep_the_id_as_is() {
    assert_eq!(
        key("p", &[b"dedup", b"h", b"a b\n:x"]),
        b"p:dedup:h:a b\n:x"
    );
    assert_eq!(key("p", &[b"job", b"m1"]), b"p:job:m1");
    assert_eq!(key("p", &[b"seq", b"h", b"order-1"]), b"p:seq:h:order-1");
    assert_eq!(key("p", &[b"stamp", b"order-1"]), b"p:stamp:order-1");
}

#[test]
fn next_numbers_are_parsed_strictly() {
    assert_eq!(parse_next(None), Ok(1));
    assert_eq!(parse_next(Some(b"42".to_vec())), Ok(42));
    assert_eq!(
        parse_next(Some(u64::MAX.to_string().into_bytes())),
        Ok(u64::MAX)
    );
    assert!(parse_next(Some(b"-1".to_vec())).is_err());
    assert!(parse_next(Some(b"05".to_vec())).is_err());
    assert!(parse_next(Some(b"+5".to_vec())).is_err());
    assert!(parse_next(Some(b"x".to_vec())).is_err());
}
