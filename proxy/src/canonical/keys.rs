//! Key comparison as the most lenient upstream does it.

/// The case fold of a key: two keys with the same fold are one key to a case-insensitive
/// decoder. Each character is upper-cased then lower-cased, so the Unicode characters that Go's
/// `strings.EqualFold` treats as a letter's case variant (`ſ` for `s`, the Kelvin sign `K` for
/// `k`) fold together with it; the fold is a superset of Go's simple folding (it also folds
/// `ß` with `ss`), which only makes refusal stricter.
pub fn fold_key(k: &str) -> String {
    k.chars()
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
        .collect()
}

/// Does `k` name one of the reserved method-override fields (`_method`, in any case)?
pub(super) fn is_method_override_field(k: &str) -> bool {
    fold_key(k) == "_method"
}
