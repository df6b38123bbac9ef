//! Errors as people read them, for log lines and the command line's last line: no Rust
//! names. librdkafka's error codes read as their descriptions (`Local: All broker
//! connections are down`, not `AllBrokersDown (Local: All broker connections are down)`),
//! rdkafka's wrappers (`KafkaError (...)`, `Global error: ...`) are left out, and a chain of
//! causes is said once each.

use std::error::Error;

use rdkafka::types::RDKafkaErrorCode;

/// The text librdkafka gives an error code (`Local: Broker transport failure`), without the
/// code's Rust name.
pub fn describe(code: RDKafkaErrorCode) -> String {
    let text = code.to_string();
    let name = format!("{code:?} (");
    match text.strip_prefix(&name) {
        Some(rest) => rest.strip_suffix(')').unwrap_or(rest).to_owned(),
        None => text,
    }
}

/// One line: every cause in `chain` once, outermost first, joined by ": ". A cause whose
/// text its outer cause already says is left out; librdkafka's error codes read as their
/// descriptions.
pub fn render_chain(chain: &[&(dyn Error + 'static)]) -> String {
    let mut replacements: Vec<(String, String)> = Vec::new();
    for cause in chain {
        let code = cause
            .downcast_ref::<RDKafkaErrorCode>()
            .copied()
            .or_else(|| {
                cause
                    .downcast_ref::<rdkafka::error::KafkaError>()
                    .and_then(|e| e.rdkafka_error_code())
            });
        if let Some(code) = code {
            replacements.push((code.to_string(), describe(code)));
        }
    }
    let mut parts: Vec<String> = Vec::new();
    for cause in chain {
        let mut text = cause.to_string();
        for (raw, readable) in &replacements {
            text = text.replace(raw.as_str(), readable);
        }
        let text = text.trim().to_owned();
        if text.is_empty() || parts.iter().any(|said| said.contains(&text)) {
            continue;
        }
        parts.push(text);
    }
    parts.join(": ")
}

/// [`render_chain`] of an error and its sources, then [`text`].
pub fn render(error: &(dyn Error + 'static)) -> String {
    let mut chain = vec![error];
    while let Some(source) = chain[chain.len() - 1].source() {
        chain.push(source);
    }
    text(&render_chain(&chain))
}

/// An error's text (what its `Display` says, of any type) without rdkafka's Rust names:
/// `AllBrokersDown (Local: All broker connections are down)` reads as its description,
/// `KafkaError (X)` as X, and a leading `Global error: ` (librdkafka's error callback) is
/// left out.
pub fn text(text: &str) -> String {
    let out = without_names(text).replace("(Fatal) ", "fatal: ");
    match out.strip_prefix("Global error: ") {
        Some(rest) => rest.to_owned(),
        None => out,
    }
}

fn without_names(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        match code_at(rest) {
            Some((inner, len)) => {
                out.push_str(&without_names(inner));
                rest = &rest[len..];
            }
            None => {
                let mut chars = rest.chars();
                let c = chars.next().unwrap_or_default();
                // Skip to the next word start, so that names are only matched whole.
                out.push(c);
                rest = chars.as_str();
                if c.is_ascii_alphanumeric() {
                    let word = rest
                        .find(|c: char| !c.is_ascii_alphanumeric())
                        .unwrap_or(rest.len());
                    out.push_str(&rest[..word]);
                    rest = &rest[word..];
                }
            }
        }
    }
    out
}

/// At the start of `text`: `Name (inner)` where Name is an rdkafka error-code name (an
/// identifier starting with an upper-case letter, or `KafkaError`) and inner is a
/// librdkafka description (`Local: ...`, `Broker: ...`) or, after `KafkaError`, anything.
/// Returns the inner text (itself made readable) and the length matched.
fn code_at(text: &str) -> Option<(&str, usize)> {
    let name_len = text
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(text.len());
    let name = &text[..name_len];
    if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_uppercase()) {
        return None;
    }
    let after = text[name_len..].strip_prefix(" (")?;
    // The matching parenthesis.
    let mut depth = 1usize;
    let mut close = None;
    for (i, c) in after.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(i);
                    break;
                }
            }
            _ => {}
        }
    }
    let inner = &after[..close?];
    let described =
        ["Local: ", "Broker: "].iter().any(|p| inner.starts_with(p)) || inner == "Unknown error";
    if name != "KafkaError" && !described {
        return None;
    }
    Some((inner, name_len + 2 + inner.len() + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::KafkaError;

    #[test]
    fn error_codes_read_as_their_descriptions_without_rust_names() {
        let global = KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        assert_eq!(
            global.to_string(),
            "Global error: AllBrokersDown (Local: All broker connections are down)",
            "what rdkafka says"
        );
        assert_eq!(render(&global), "Local: All broker connections are down");
        assert_eq!(
            text(&global.to_string()),
            "Local: All broker connections are down"
        );
        let fetch = KafkaError::MetadataFetch(RDKafkaErrorCode::BrokerTransportFailure);
        assert_eq!(
            render(&fetch),
            "Meta data fetch error: Local: Broker transport failure"
        );
        assert_eq!(
            text(&format!("{fetch:?}")),
            "Metadata fetch error: Local: Broker transport failure"
        );
        let produce = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        let said = text(&produce.to_string());
        assert!(!said.contains("MessageSizeTooLarge"), "{said}");
        assert!(
            said.starts_with("Message production error: Broker: "),
            "{said}"
        );
    }

    #[test]
    fn other_text_is_left_alone() {
        for plain in [
            "a record for topic npsflow.dlq was rejected for good",
            "expected value at line 1 column 2",
            "Unknown (not a code)",
            "Topic (npsflow.state) has 3 partitions",
            "",
        ] {
            assert_eq!(text(plain), plain);
        }
        assert_eq!(
            text("(Fatal) KafkaError (Message consumption error: Fatal (Local: Fatal error))"),
            "fatal: Message consumption error: Local: Fatal error"
        );
    }
}
