//! Cache groups (RFC 9875): a response names the groups it belongs to in
//! `Cache-Groups`, and the response to a successful unsafe request names groups to
//! invalidate in `Cache-Group-Invalidation`, both Structured Fields lists of strings
//! (through `sfv`). Groups are scoped to the origin that named them, so each is
//! stored as a tag carrying that scope: one origin cannot invalidate another's.

use http::{HeaderMap, HeaderName};
use sfv::{BareItem, List, ListEntry};

use super::structured::parse_field;

/// The response field listing the groups a response belongs to.
pub(crate) const CACHE_GROUPS: HeaderName = HeaderName::from_static("cache-groups");
/// The response field listing the groups a write invalidates.
pub(crate) const CACHE_GROUP_INVALIDATION: HeaderName =
    HeaderName::from_static("cache-group-invalidation");

/// Most groups read from one field: more are ignored (a response has at most 64
/// tags in all).
const MAX_GROUPS: usize = 32;

/// The tags standing for the groups `field` lists in `headers`, scoped to `scope`
/// (the origin's authority, as the route keys it). A field that does not parse,
/// and members that are not strings, name no group (RFC 9875 §2).
pub(crate) fn group_tags(headers: &HeaderMap, field: &HeaderName, scope: &str) -> Vec<String> {
    let Some(list) = parse_field::<List>(headers, field) else {
        return Vec::new();
    };
    let mut tags: Vec<String> = Vec::new();
    for member in &list {
        if tags.len() == MAX_GROUPS {
            break;
        }
        if let ListEntry::Item(item) = member {
            if let BareItem::String(group) = &item.bare_item {
                let tag = group_tag(scope, group.as_str());
                if !tags.contains(&tag) {
                    tags.push(tag);
                }
            }
        }
    }
    tags
}

/// The tag a group of `scope` is stored as. Groups are compared case-sensitively;
/// the scope (an authority) is lower case.
fn group_tag(scope: &str, group: &str) -> String {
    format!("cache-group {scope} {group}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn tags(lines: &[&'static str]) -> Vec<String> {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(CACHE_GROUPS, HeaderValue::from_static(line));
        }
        group_tags(&headers, &CACHE_GROUPS, "api.test")
    }

    #[test]
    fn groups_are_strings_of_a_list_scoped_to_the_origin() {
        assert_eq!(
            tags(&["\"scripts\", \"styles\"", "\"Scripts\""]),
            [
                "cache-group api.test scripts",
                "cache-group api.test styles",
                "cache-group api.test Scripts"
            ]
        );
        // Not strings, or repeated: nothing more.
        assert_eq!(
            tags(&["scripts, 1, \"a\", \"a\";p=1"]),
            ["cache-group api.test a"]
        );
        assert_eq!(tags(&[]), Vec::<String>::new());
    }

    #[test]
    fn a_field_that_does_not_parse_names_no_group() {
        assert!(tags(&["\"a\", ((("]).is_empty());
        assert!(tags(&["\"unterminated"]).is_empty());
        let many = (0..100)
            .map(|i| format!("\"g{i}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut headers = HeaderMap::new();
        headers.insert(CACHE_GROUPS, HeaderValue::from_str(&many).unwrap());
        assert_eq!(group_tags(&headers, &CACHE_GROUPS, "x").len(), MAX_GROUPS);
    }
}
