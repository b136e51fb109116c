//! Structured Field values (RFC 8941) read from a message through `sfv`: all the
//! lines of a field parsed as one value (§4.2), the way targeted cache-control
//! fields and cache groups are read.

use http::{HeaderMap, HeaderName};
use sfv::{FieldType, Parser};

/// The value of field `name` as a `T` (a dictionary, a list); `None` when the field
/// is absent or does not parse.
pub(crate) fn parse_field<T: FieldType>(headers: &HeaderMap, name: &HeaderName) -> Option<T> {
    let mut lines = headers.get_all(name).iter();
    let first = lines.next()?;
    let mut joined = first.as_bytes().to_vec();
    for line in lines {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(line.as_bytes());
    }
    Parser::new(&joined).parse().ok()
}
