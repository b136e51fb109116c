//! Tags (surrogate keys) of a response: from the route's tag header, the handler's
//! overrides and its cache groups, bounded in number and size.

use http::HeaderMap;

use crate::entry::{Tags, TagsBuilder};
use crate::policy::presence::has_field;
use crate::policy::settings::RouteSettings;

/// The tags in the route's tag header (separated by spaces or commas), then those of
/// the handler, then the cache groups (`groups`, already scoped), each once, at most
/// 64; the header is removed unless the route keeps it.
pub(crate) fn response_tags(
    headers: &mut HeaderMap,
    settings: &RouteSettings,
    from_handler: &[String],
    groups: &[String],
) -> Tags {
    let mut tags = TagsBuilder::default();
    let tagged = settings
        .tag_header
        .as_ref()
        .filter(|name| has_field(headers, name));
    if let Some(name) = tagged {
        for value in headers.get_all(name) {
            tags.reserve(value.len());
            if let Ok(text) = value.to_str() {
                split_tags(text, &mut |tag| tags.add(tag));
            }
        }
    }
    for tag in from_handler.iter().chain(groups) {
        tags.add(tag);
    }
    if let Some(name) = settings.hidden_tag_header() {
        if has_field(headers, name) {
            headers.remove(name);
        }
    }
    tags.finish()
}

/// Passes each word of `text` between spaces and commas to `add`, empty ones too.
/// By bytes: `str::split` on two separators decoded each character and compared it
/// with both (about 25 instructions a byte).
fn split_tags(text: &str, add: &mut impl FnMut(&str)) {
    let mut start = 0;
    for (at, byte) in text.bytes().enumerate() {
        if byte == b' ' || byte == b',' {
            // ASCII separators: `start..at` lies on character boundaries.
            add(text.get(start..at).unwrap_or_default());
            start = at + 1;
        }
    }
    add(text.get(start..).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn tags_are_split_deduplicated_bounded_and_the_header_hidden() {
        let mut headers = HeaderMap::new();
        headers.append("cache-tag", HeaderValue::from_static("a b,a,,c"));
        headers.append("cache-tag", HeaderValue::from_static(" c,"));
        let long = "x".repeat(300);
        headers.append("cache-tag", HeaderValue::from_str(&long).unwrap());
        let from_handler = vec!["c".to_owned(), "d".to_owned(), String::new()];
        let tags = response_tags(&mut headers, &RouteSettings::default(), &from_handler, &[]);
        assert_eq!(tags, ["a", "b", "c", "d"]);
        assert!(!headers.contains_key("cache-tag"));

        let many: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
        let tags = response_tags(&mut HeaderMap::new(), &RouteSettings::default(), &many, &[]);
        assert_eq!(tags.len(), crate::entry::MAX_TAGS);
    }

    #[test]
    fn without_a_tag_header_only_the_handlers_count_and_the_field_stays() {
        let settings = RouteSettings {
            tag_header: None,
            ..RouteSettings::default()
        };
        let mut headers = HeaderMap::new();
        headers.insert("cache-tag", HeaderValue::from_static("a"));
        let tags = response_tags(&mut headers, &settings, &["b".to_owned()], &[]);
        assert_eq!(tags, ["b"]);
        assert!(headers.contains_key("cache-tag"));
    }
}
