//! The Vary index: a URL whose responses vary is stored as variants, each under a key
//! of the request's values of the `Vary`'d headers, beside an index of those names
//! under the URL's primary key. Looking up follows the index; storing keeps it.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use tower::util::rng::{HasherRng, Rng};

use super::{Engine, Lookup, LookupMiss};
use crate::entry::{CachedResponse, Entry, VaryIndex};
use crate::key::{normalised_value, CacheKey};

impl Engine {
    /// Finds the stored response for a request: the entry under the primary key, or
    /// the variant its `Vary` index selects.
    pub(crate) async fn lookup(&self, primary: &CacheKey, headers: &HeaderMap) -> Lookup {
        let Some((entry, tier)) = self.store.get(primary).await else {
            return Lookup::Miss(LookupMiss::Uri);
        };
        let response = match entry {
            Entry::Response(response) => response,
            Entry::Variants(index) => {
                let variant = primary.variant(index.generation, &index.names, headers);
                match self.store.get(&variant).await {
                    Some((Entry::Response(response), _)) => response,
                    _ => return Lookup::Miss(LookupMiss::Vary),
                }
            }
            // The direct API's values live under keys of their own kind.
            Entry::Value(_) => return Lookup::Miss(LookupMiss::Uri),
        };
        if !selected_by(&response, headers) {
            return Lookup::Miss(LookupMiss::Vary);
        }
        Lookup::Hit(response, tier)
    }

    /// Stores a response under its primary key, or as a variant with its index.
    /// `started`: when the response's origin call started.
    pub(super) async fn store_response(
        &self,
        primary: CacheKey,
        response: Arc<CachedResponse>,
        started: SystemTime,
    ) {
        if response.vary.is_empty() {
            let entry = Entry::Response(response);
            self.store.put(primary, entry, started);
            return;
        }
        // Boxed: inline, the index's lookup would enlarge every fill's future.
        Box::pin(self.store_variant(primary, response, started)).await;
    }

    /// Stores a response that varies as a variant, and its index.
    async fn store_variant(
        &self,
        primary: CacheKey,
        response: Arc<CachedResponse>,
        started: SystemTime,
    ) {
        let names: Vec<HeaderName> = response.vary.iter().map(|(name, _)| name.clone()).collect();
        let mut stale_until = response.stale_until;
        let mut generation = HasherRng::default().next_u64();
        // Keep the index (and the variants under it) alive as long as the
        // longest-lived variant. With no index (never stored, or invalidated), the
        // new generation leaves every earlier variant unreachable.
        if let Some((Entry::Variants(old), _)) = self.store.get(&primary).await {
            if old.names == names {
                stale_until = stale_until.max(old.stale_until);
                generation = old.generation;
            }
        }
        let variant = variant_key(&primary, generation, &response.vary);
        let entry = Entry::Response(response);
        self.store.put(variant, entry, started);
        let index = Entry::Variants(Arc::new(VaryIndex {
            names,
            stale_until,
            generation,
        }));
        self.store.put(primary, index, started);
    }
}

/// Whether the request would have selected this stored response: its values of the
/// stored `Vary` names match the storing request's. A variant is never served to a
/// request that would not have selected it.
fn selected_by(response: &CachedResponse, headers: &HeaderMap) -> bool {
    response.vary.iter().all(|(name, stored)| {
        let present = headers.contains_key(name);
        match stored {
            Some(value) => present && normalised_value(headers, name) == value.as_ref(),
            None => !present,
        }
    })
}

/// The variant key from stored request values (as the lookup computes it from the
/// request's headers).
fn variant_key(
    primary: &CacheKey,
    generation: u64,
    vary: &[(HeaderName, Option<Bytes>)],
) -> CacheKey {
    let mut headers = HeaderMap::new();
    let mut names = Vec::with_capacity(vary.len());
    for (name, value) in vary {
        names.push(name.clone());
        if let Some(value) = value {
            if let Ok(value) = HeaderValue::from_maybe_shared(value.clone()) {
                let _ = headers.try_insert(name.clone(), value);
            }
        }
    }
    primary.variant(generation, &names, &headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn varied(values: &[(&'static str, Option<&'static str>)]) -> CachedResponse {
        CachedResponse::builder(StatusCode::OK, HeaderMap::new(), Bytes::new())
            .vary(
                values
                    .iter()
                    .map(|(name, value)| {
                        (
                            HeaderName::from_static(name),
                            value.map(|v| Bytes::from_static(v.as_bytes())),
                        )
                    })
                    .collect(),
            )
            .build()
    }

    #[test]
    fn a_variant_is_selected_only_by_the_values_it_was_stored_for() {
        let en = varied(&[("accept-language", Some("en"))]);
        let absent = varied(&[("accept-language", None)]);
        let mut request = HeaderMap::new();
        assert!(!selected_by(&en, &request));
        assert!(selected_by(&absent, &request));
        request.insert("accept-language", HeaderValue::from_static(" en "));
        assert!(selected_by(&en, &request), "values are trimmed");
        assert!(!selected_by(&absent, &request));
        request.insert("accept-language", HeaderValue::from_static("fr"));
        assert!(!selected_by(&en, &request));
    }

    #[test]
    fn the_variant_key_from_stored_values_is_the_lookups() {
        let primary = CacheKey::from_bytes([4; 32]);
        let stored = [(
            HeaderName::from_static("accept"),
            Some(Bytes::from_static(b"a/b")),
        )];
        let mut request = HeaderMap::new();
        request.insert("accept", HeaderValue::from_static("a/b"));
        let names = [HeaderName::from_static("accept")];
        assert_eq!(
            variant_key(&primary, 9, &stored),
            primary.variant(9, &names, &request)
        );
        assert_ne!(
            variant_key(&primary, 9, &stored),
            variant_key(&primary, 10, &stored)
        );
    }
}
