//! The properties the fuzz targets (`fuzz/`) and their proptest twins (below) check,
//! each over arbitrary bytes: the entry codec, the `Cache-Control` parser, key
//! canonicalisation, conditional requests, and the whole layer. A property fails by
//! panicking; anything else (an error, a miss, a pass-through) is a pass. Not part of
//! the API.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, IF_MODIFIED_SINCE, IF_NONE_MATCH};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame};

use crate::cache::HybridCache;
use crate::entry::{decode_entry, encode_entry};
use crate::key::canonical::{write_canonical_path, write_canonical_query};
use crate::key::CacheKey;
use crate::policy::cache_control::{CacheControl, DELTA_SECONDS_CAP};
use crate::policy::conditional::{has_origin_preconditions, is_not_modified};
use crate::policy::settings::{QueryFilter, RouteSettings};

/// Decoding never panics; whatever decodes encodes back to bytes that decode to the
/// same entry.
pub fn entry_codec(data: &[u8]) {
    if let Ok(entry) = decode_entry(Bytes::copy_from_slice(data)) {
        let again = decode_entry(encode_entry(&entry));
        assert_eq!(again.as_ref(), Ok(&entry));
    }
}

/// Parsing never panics, every delta it reads is within the cap, and a field split
/// over several lines reads as one list.
pub fn cache_control(data: &[u8]) {
    let mut lines = HeaderMap::new();
    for line in data.split(|&b| b == b'\n').take(16) {
        if let Ok(value) = HeaderValue::from_bytes(line) {
            let _ = lines.try_append(CACHE_CONTROL, value);
        }
    }
    let cc = CacheControl::from_headers(&lines);
    let deltas = [
        cc.max_age,
        cc.s_maxage,
        cc.min_fresh,
        cc.stale_while_revalidate,
        cc.stale_if_error,
        cc.max_stale.flatten(),
    ];
    for delta in deltas.into_iter().flatten() {
        assert!(delta <= DELTA_SECONDS_CAP, "{delta} past the cap");
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let one = CacheControl::parse(text);
        for delta in [one.max_age, one.s_maxage].into_iter().flatten() {
            assert!(delta <= DELTA_SECONDS_CAP, "{delta} past the cap");
        }
    }
}

/// Canonical paths and queries are fixed points (canonicalising again changes
/// nothing), and any URI that parses gets a key.
pub fn cache_key(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (path, query) = match text.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (&*text, None),
    };
    let once = canonical(|out| write_canonical_path(path, out));
    let twice = canonical(|out| write_canonical_path(&once, out));
    assert_eq!(once, twice, "path {path:?}");
    let filter = QueryFilter::All;
    let once = canonical(|out| write_canonical_query(query, &filter, out));
    let twice = canonical(|out| write_canonical_query(Some(&once), &filter, out));
    assert_eq!(once, twice, "query {query:?}");
    if let Ok(uri) = Uri::try_from(data) {
        let settings = RouteSettings::default();
        let key = CacheKey::primary(&Method::GET, &uri, &HeaderMap::new(), &settings);
        // HEAD is answered from the GET entry.
        let head = CacheKey::primary(&Method::HEAD, &uri, &HeaderMap::new(), &settings);
        assert_eq!(key, head);
    }
}

fn canonical(write: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut out = Vec::new();
    write(&mut out);
    // Only escapes of unreserved (ASCII) characters are decoded: UTF-8 stays UTF-8.
    String::from_utf8(out).unwrap_or_else(|e| panic!("canonical form is not UTF-8: {e}"))
}

/// Request headers, a line `--`, then stored headers (`name: value` lines): whether
/// the stored response answers with 304 never panics, and without a condition it
/// never does.
pub fn conditional(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (request, stored) = text.split_once("\n--\n").unwrap_or((&text, ""));
    let (request, stored) = (header_lines(request), header_lines(stored));
    let not_modified = is_not_modified(&request, &stored, SystemTime::now());
    let _ = has_origin_preconditions(&request);
    if !request.contains_key(IF_NONE_MATCH) && !request.contains_key(IF_MODIFIED_SINCE) {
        assert!(!not_modified, "a 304 for a request without conditions");
    }
}

/// `name: value` lines, those that are a valid field, at most 64.
fn header_lines(text: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in text.lines().take(64) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value.trim()),
        ) {
            let _ = headers.try_append(name, value);
        }
    }
    headers
}

/// One exchange of a layer script: a request, and what the origin answers to it.
struct Exchange {
    request: Request<()>,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// Reads a script: exchanges separated by a blank line, each `METHOD URI`, request
/// header lines, `--`, a status, response header lines, `--`, then the body. At most 8
/// exchanges; anything unreadable is skipped.
fn script(data: &[u8]) -> Vec<Exchange> {
    let text = String::from_utf8_lossy(data);
    text.split("\n\n")
        .take(8)
        .filter_map(|record| {
            let mut parts = record.splitn(3, "\n--\n");
            let (head, answer, body) = (parts.next()?, parts.next()?, parts.next().unwrap_or(""));
            let (request_line, request_headers) = head.split_once('\n').unwrap_or((head, ""));
            let (method, uri) = request_line.split_once(' ')?;
            let mut request = Request::builder()
                .method(Method::from_bytes(method.as_bytes()).ok()?)
                .uri(Uri::try_from(uri).ok()?)
                .body(())
                .ok()?;
            *request.headers_mut() = header_lines(request_headers);
            let (status, response_headers) = answer.split_once('\n').unwrap_or((answer, ""));
            Some(Exchange {
                request,
                status: StatusCode::from_u16(status.trim().parse().ok()?).ok()?,
                headers: header_lines(response_headers),
                body: Bytes::copy_from_slice(body.as_bytes()),
            })
        })
        .collect()
}

/// A whole body in one frame.
struct WholeBody(Option<Bytes>);

impl Body for WholeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|data| Ok(Frame::data(data))))
    }
}

/// The key of what the origin was asked, written before the body it answered: what
/// the cache serves must carry the key of the request it serves.
fn marked(key: &CacheKey, body: &[u8]) -> Bytes {
    let mut out = key.to_hex().into_bytes();
    out.push(b'|');
    out.extend_from_slice(body);
    Bytes::from(out)
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap_or_else(|e| panic!("a runtime for the layer target: {e}"))
    })
}

/// Runs a script through a memory-only cache in front of an origin that answers
/// each exchange as the script says: the layer never panics, and every body it
/// serves belongs to the request's key (the origin marks each body with the key it
/// was asked for). Returns how many answers were hits.
pub fn layer(data: &[u8]) -> usize {
    let exchanges = script(data);
    if exchanges.is_empty() {
        return 0;
    }
    runtime().block_on(async move {
        let mut hits = 0;
        // One cache for the process, emptied before each script: building one costs
        // more than a short script.
        static CACHE: tokio::sync::OnceCell<Option<HybridCache>> =
            tokio::sync::OnceCell::const_new();
        let built = CACHE
            .get_or_init(|| async { HybridCache::builder().build().await.ok() })
            .await;
        let Some(cache) = built.clone() else {
            return hits;
        };
        cache.purge_all().await;
        cache.run_pending_tasks().await;
        let settings = RouteSettings::default();
        let answer: Arc<Mutex<(StatusCode, HeaderMap, Bytes)>> =
            Arc::new(Mutex::new((StatusCode::OK, HeaderMap::new(), Bytes::new())));
        let given = Arc::clone(&answer);
        let origin = tower::service_fn(
            move |request: Request<crate::layer::RequestBody<WholeBody>>| {
                let (status, headers, body) =
                    given.lock().unwrap_or_else(PoisonError::into_inner).clone();
                let key = CacheKey::primary(
                    request.method(),
                    request.uri(),
                    request.headers(),
                    &RouteSettings::default(),
                );
                let mut response = Response::new(WholeBody(Some(marked(&key, &body))));
                *response.status_mut() = status;
                *response.headers_mut() = headers;
                std::future::ready(Ok::<_, Infallible>(response))
            },
        );
        let layer = cache.layer().ttl(Duration::from_secs(60));
        let service = tower::Layer::layer(&layer, origin);
        for exchange in exchanges {
            *answer.lock().unwrap_or_else(PoisonError::into_inner) =
                (exchange.status, exchange.headers, exchange.body);
            let request = exchange.request.map(|()| WholeBody(None));
            let key = CacheKey::primary(
                request.method(),
                request.uri(),
                request.headers(),
                &settings,
            );
            let Ok(response) = tower::ServiceExt::oneshot(service.clone(), request).await;
            let hit = response
                .headers()
                .get_all("cache-status")
                .iter()
                .any(|v| v.as_bytes().windows(5).any(|w| w == b"; hit"));
            hits += usize::from(hit);
            let body = collect(response.into_body()).await;
            if let Some(mark) = body.get(..64).filter(|_| body.get(64) == Some(&b'|')) {
                assert_eq!(mark, key.to_hex().as_bytes(), "a body of another key");
            }
            cache.run_pending_tasks().await;
        }
        hits
    })
}

async fn collect<B: Body<Data = Bytes>>(body: B) -> Vec<u8> {
    let mut body = std::pin::pin!(body);
    let mut out = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    out.extend_from_slice(&data);
                }
            }
            Err(_) => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    //! The fuzz targets as bounded proptests, run with every `cargo test`.

    use proptest::prelude::*;

    /// Bytes biased towards what the parsers look for.
    fn text(alphabet: &'static str, len: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                3 => proptest::sample::select(alphabet.as_bytes().to_vec()),
                1 => any::<u8>(),
            ],
            0..len,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn entry_codec(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            super::entry_codec(&data);
        }

        #[test]
        fn cache_control(data in text("max-age=s-maxage,no-cache\"private 0123456789\n", 96)) {
            super::cache_control(&data);
        }

        #[test]
        fn cache_key(data in text("/%2aAfF?&=+~._-09http:/a", 96)) {
            super::cache_key(&data);
        }

        #[test]
        fn conditional(data in text("if-none-match: \"W/*,etag:if-modified-since:Mon, 01 Jun 2026 00:00:00 GMT\n--", 160)) {
            super::conditional(&data);
        }

        #[test]
        fn layer(data in text("GET HEAD POST /a?b=1 http://h/\nhost: h\n--\n200 304 404\ncache-control: max-age=60, no-store\nvary: accept\netag: \"x\"\naccept: y\n\n", 400)) {
            let _ = super::layer(&data);
        }
    }

    #[test]
    fn a_stored_response_is_served_under_its_own_key_only() {
        // The seed the layer target starts from: two URLs, each stored, each hit.
        let script = b"GET http://h/a\n--\n200\ncache-control: max-age=60\n--\na\n\n\
                       GET http://h/b\n--\n200\ncache-control: max-age=60\n--\nb\n\n\
                       GET http://h/a\n--\n200\n--\nnot this\n\n\
                       GET http://h/b\n--\n200\n--\nnot this";
        assert_eq!(super::script(script).len(), 4);
        assert_eq!(super::layer(script), 2);
    }

    /// The codec target's seeds are entries of this format, so that fuzzing starts
    /// past the format check: a format change that leaves them behind fails here.
    #[test]
    fn the_entry_codec_seeds_decode() {
        let seeds: [&[u8]; 5] = [
            include_bytes!("../fuzz/seeds/entry_codec/empty"),
            include_bytes!("../fuzz/seeds/entry_codec/plain"),
            include_bytes!("../fuzz/seeds/entry_codec/value"),
            include_bytes!("../fuzz/seeds/entry_codec/variants"),
            include_bytes!("../fuzz/seeds/entry_codec/vary_tags"),
        ];
        for seed in seeds {
            assert!(
                super::decode_entry(bytes::Bytes::from_static(seed)).is_ok(),
                "{seed:?}"
            );
        }
    }
}
