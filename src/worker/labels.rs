//! Worker labels (`--label zone=a`) and the labels a spawn or template
//! asks for: one rule for what a label may be.

use std::collections::BTreeMap;

/// Most labels one worker, spawn or template may carry.
pub const MAX_LABELS: usize = 16;
const MAX_KEY: usize = 63;
const MAX_VALUE: usize = 255;

/// Checks one label: a key of 1-63 letters, digits and `-_./`, a value of
/// at most 255 characters without control characters.
pub fn check(key: &str, value: &str) -> Result<(), String> {
    let key_ok = !key.is_empty()
        && key.len() <= MAX_KEY
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if !key_ok {
        return Err(format!(
            "invalid label key {:?}: use 1-{MAX_KEY} letters, digits, '-', '_', '.' or '/'",
            key.chars().take(80).collect::<String>()
        ));
    }
    if value.len() > MAX_VALUE || value.chars().any(char::is_control) {
        return Err(format!(
            "invalid value for label {key}: at most {MAX_VALUE} characters, none of them control characters"
        ));
    }
    Ok(())
}

/// Checks a set of labels.
pub fn check_all(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("at most {MAX_LABELS} labels, got {}", labels.len()));
    }
    labels.iter().try_for_each(|(k, v)| check(k, v))
}

/// Parses `KEY=VALUE`.
pub fn parse(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("a label is KEY=VALUE, got {text:?}"))?;
    check(key, value)?;
    Ok((key.to_string(), value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_and_plain() {
        assert_eq!(
            parse("zone=eu-1").ok(),
            Some(("zone".into(), "eu-1".into()))
        );
        assert!(parse("gpu=").is_ok());
        assert!(parse("no-equals").is_err());
        assert!(parse("=x").is_err());
        assert!(parse("bad key=x").is_err());
        assert!(parse(&format!("{}=x", "k".repeat(64))).is_err());
        assert!(parse(&format!("k={}", "v".repeat(256))).is_err());
        assert!(parse("k=a\nb").is_err());
        let many: BTreeMap<String, String> =
            (0..17).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(check_all(&many).is_err());
    }
}
