//! Serving stale responses (RFC 5861): which origin answers let a stale response be
//! served instead, and the stale windows a handler sets over the response's own.

use std::time::Duration;

use http::StatusCode;

use super::storable::StorePlan;

/// Statuses that let a stale entry be served instead (RFC 5861 §4: an error).
pub(crate) fn is_origin_error(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// The plan with the handler's stale windows, where it set them, in place of the
/// response's and the route's; none for a response that forbids serving stale
/// (`must-revalidate`, `proxy-revalidate`, `no-cache`).
pub(crate) fn with_windows(
    mut plan: StorePlan,
    stale_while_revalidate: Option<Duration>,
    stale_if_error: Option<Duration>,
) -> StorePlan {
    if plan.never_stale {
        return plan;
    }
    let after = |window: Duration| {
        plan.fresh_until
            .checked_add(window)
            .unwrap_or(plan.fresh_until)
    };
    if let Some(window) = stale_while_revalidate {
        plan.swr_until = after(window);
    }
    if let Some(window) = stale_if_error {
        plan.sie_until = after(window);
    }
    plan.stale_until = plan.stale_until.max(plan.swr_until).max(plan.sie_until);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn only_server_errors_let_a_stale_entry_answer() {
        for code in [500, 502, 503, 504] {
            assert!(
                is_origin_error(StatusCode::from_u16(code).unwrap()),
                "{code}"
            );
        }
        for code in [200, 304, 404, 501, 505] {
            assert!(
                !is_origin_error(StatusCode::from_u16(code).unwrap()),
                "{code}"
            );
        }
    }

    #[test]
    fn the_handlers_windows_replace_the_plans_and_extend_what_is_kept() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let plan = StorePlan {
            stored_at: now,
            initial_age: Duration::ZERO,
            fresh_until: now,
            swr_until: now + Duration::from_secs(5),
            sie_until: now,
            stale_until: now + Duration::from_secs(5),
            vary: Vec::new(),
            never_stale: false,
        };
        let unchanged = with_windows(plan.clone(), None, None);
        assert_eq!(unchanged, plan);
        let windowed = with_windows(
            plan.clone(),
            Some(Duration::from_secs(1)),
            Some(Duration::from_secs(60)),
        );
        assert_eq!(windowed.swr_until, now + Duration::from_secs(1));
        assert_eq!(windowed.sie_until, now + Duration::from_secs(60));
        assert_eq!(windowed.stale_until, now + Duration::from_secs(60));
        // must-revalidate and its kind rule out every window.
        let strict = StorePlan {
            never_stale: true,
            ..plan
        };
        let windowed = with_windows(strict.clone(), Some(Duration::from_secs(1)), None);
        assert_eq!(windowed, strict);
    }
}
