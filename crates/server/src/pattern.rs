//! OpenSSH's pattern matching (match.c): `*` and `?` wildcards, and
//! comma-separated lists where a `!` pattern denies.

/// Whether `text` matches `pattern` (`*` any run, `?` any one character).
pub(crate) fn matches(text: &str, pattern: &str) -> bool {
    fn go(text: &[char], pattern: &[char]) -> bool {
        match pattern.split_first() {
            None => text.is_empty(),
            Some(('*', rest)) => (0..=text.len()).any(|skip| go(&text[skip..], rest)),
            Some(('?', rest)) => !text.is_empty() && go(&text[1..], rest),
            Some((c, rest)) => text.first() == Some(c) && go(&text[1..], rest),
        }
    }
    let text: Vec<char> = text.chars().collect();
    let pattern: Vec<char> = pattern.chars().collect();
    go(&text, &pattern)
}

/// Whether `text` matches the comma-separated `list`: some pattern matches and
/// no negated (`!`) pattern does.
pub(crate) fn matches_list(text: &str, list: &str) -> bool {
    let mut found = false;
    for pattern in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match pattern.strip_prefix('!') {
            Some(negated) if matches(text, negated) => return false,
            Some(_) => {}
            None if matches(text, pattern) => found = true,
            None => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(matches("alice", "al*"));
        assert!(matches("alice", "?lice"));
        assert!(!matches("bob", "al*"));
        assert!(matches("", "*"));
    }

    #[test]
    fn lists_with_negation() {
        let list = "/usr/lib*/*,/usr/local/lib*/*";
        assert!(matches_list(
            "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
            list
        ));
        assert!(matches_list("/usr/local/lib/libfoo.so", list));
        assert!(!matches_list("/tmp/evil.so", list));
        assert!(!matches_list(
            "/usr/lib/evil.so",
            "/usr/lib/*,!/usr/lib/evil.so"
        ));
    }
}
