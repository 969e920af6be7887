//! Passwords never reach logs or errors: every URL's password is replaced before a text
//! leaves the crate. Imports nothing.

/// Replaces the password of every `scheme://user:password@` in `text` with `***`.
///
/// ```
/// assert_eq!(
///     cottontail::connection::redact("amqp://guest:secret@host:5672/%2f"),
///     "amqp://guest:***@host:5672/%2f"
/// );
/// ```
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        // The URL runs to the next whitespace or the next URL of a list (`…,amqps://…`).
        // Quotes, commas and slashes may be part of an unencoded password, so the userinfo
        // ends at the URL's *last* `@` (over-redacting a path or query that holds an `@`).
        let mut end = tail.find(char::is_whitespace).unwrap_or(tail.len());
        if let Some(next) = tail[..end].find("://") {
            end = tail[..next]
                .trim_end_matches(|c: char| c.is_ascii_alphanumeric() || "+-.".contains(c))
                .len();
        }
        let url = &tail[..end];
        match url.rfind('@') {
            Some(at) => {
                let userinfo = &url[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&url[at..]);
            }
            None => out.push_str(url),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}
