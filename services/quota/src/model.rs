//! Scopes, limits and daily windows: the vocabulary shared by the stores and the engine.

use std::fmt;

use chrono::{DateTime, Days, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use meshgate_proto::common::v1::Principal;
use meshgate_proto::quota::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::Error;

/// Largest token amount (estimate, usage or limit) accepted; beyond it a value is a bug or abuse.
/// Kept far below 2^53 so sums stay exact in Redis' Lua numbers.
pub const MAX_TOKENS: i64 = 1_000_000_000_000;
/// Largest money amount accepted, micro-dollars ($1 billion).
pub const MAX_COST_MICROS: i64 = 1_000_000_000_000_000;
/// Largest per-minute limit accepted.
pub const MAX_PER_MINUTE: i64 = 1_000_000_000;
/// Longest scope id or request id accepted, bytes.
pub const MAX_ID_LEN: usize = 256;

/// What a limit applies to, broadest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeKind {
    Org,
    Project,
    User,
    Key,
}

impl ScopeKind {
    pub const ALL: [ScopeKind; 4] = [ScopeKind::Org, ScopeKind::Project, ScopeKind::User, ScopeKind::Key];

    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Org => "org",
            ScopeKind::Project => "project",
            ScopeKind::User => "user",
            ScopeKind::Key => "key",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    fn from_proto(kind: i32) -> Option<Self> {
        match pb::ScopeKind::try_from(kind).ok()? {
            pb::ScopeKind::Org => Some(ScopeKind::Org),
            pb::ScopeKind::Project => Some(ScopeKind::Project),
            pb::ScopeKind::User => Some(ScopeKind::User),
            pb::ScopeKind::Key => Some(ScopeKind::Key),
            pb::ScopeKind::Unspecified => None,
        }
    }

    fn to_proto(self) -> pb::ScopeKind {
        match self {
            ScopeKind::Org => pb::ScopeKind::Org,
            ScopeKind::Project => pb::ScopeKind::Project,
            ScopeKind::User => pb::ScopeKind::User,
            ScopeKind::Key => pb::ScopeKind::Key,
        }
    }
}

/// One scope, e.g. the key `k_123`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    pub kind: ScopeKind,
    pub id: String,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.id)
    }
}

impl Scope {
    pub fn new(kind: ScopeKind, id: impl Into<String>) -> Result<Self, Error> {
        let id = id.into();
        validate_id(&format!("{} id", kind.as_str()), &id)?;
        Ok(Self { kind, id })
    }

    /// Parses a scope from the wire; an unspecified kind or an empty id is invalid.
    pub fn from_proto(scope: Option<&pb::Scope>) -> Result<Self, Error> {
        let scope = scope.ok_or_else(|| Error::InvalidArgument("scope is required".into()))?;
        let kind = ScopeKind::from_proto(scope.kind).ok_or_else(|| {
            Error::InvalidArgument(format!("scope kind {} is not one of org, project, user, key", scope.kind))
        })?;
        Self::new(kind, scope.id.clone())
    }

    pub fn to_proto(&self) -> pb::Scope {
        pb::Scope { kind: self.kind.to_proto() as i32, id: self.id.clone() }
    }

    /// Every scope a request of `principal` is charged to, broadest first. Organization, project
    /// and key are required (an empty one would leave its budget out); the user is charged when
    /// present (service keys have none).
    pub fn of_principal(principal: Option<&Principal>) -> Result<Vec<Self>, Error> {
        let p = principal.ok_or_else(|| Error::InvalidArgument("principal is required".into()))?;
        if p.org_id.is_empty() {
            return Err(Error::InvalidArgument("principal.org_id is required".into()));
        }
        if p.project_id.is_empty() {
            return Err(Error::InvalidArgument("principal.project_id is required".into()));
        }
        if p.key_id.is_empty() {
            return Err(Error::InvalidArgument("principal.key_id is required".into()));
        }
        let mut scopes =
            vec![Scope::new(ScopeKind::Org, p.org_id.clone())?, Scope::new(ScopeKind::Project, p.project_id.clone())?];
        if !p.user_id.is_empty() {
            scopes.push(Scope::new(ScopeKind::User, p.user_id.clone())?);
        }
        scopes.push(Scope::new(ScopeKind::Key, p.key_id.clone())?);
        Ok(scopes)
    }
}

/// Ids end up in Redis keys and newline-separated lists: no control characters, bounded length.
pub fn validate_id(what: &str, id: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is empty")));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Error::InvalidArgument(format!("{what} is longer than {MAX_ID_LEN} bytes")));
    }
    if id.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!("{what} contains control characters")));
    }
    Ok(())
}

/// The limits of one scope; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub tokens_per_day: i64,
    pub cost_micros_per_day: i64,
    pub requests_per_minute: i64,
    pub tokens_per_minute: i64,
    /// IANA time zone whose midnight starts the daily window of an organization and everything
    /// in it (default UTC). Only an org scope may carry one.
    pub time_zone: Option<Tz>,
}

impl Limits {
    /// Rejects negative and absurd limits.
    pub fn validate(&self) -> Result<(), Error> {
        check_amount("tokens_per_day", self.tokens_per_day, MAX_TOKENS)?;
        check_amount("cost_micros_per_day", self.cost_micros_per_day, MAX_COST_MICROS)?;
        check_amount("requests_per_minute", self.requests_per_minute, MAX_PER_MINUTE)?;
        check_amount("tokens_per_minute", self.tokens_per_minute, MAX_PER_MINUTE)?;
        Ok(())
    }

    /// [`Limits::validate`], plus: a time zone only on an org scope.
    pub fn validate_for(&self, kind: ScopeKind) -> Result<(), Error> {
        self.validate()?;
        if self.time_zone.is_some() && kind != ScopeKind::Org {
            return Err(Error::InvalidArgument(format!(
                "time_zone applies to org scopes only (the org's zone governs its projects, users and keys), \
                 not to a {} scope",
                kind.as_str()
            )));
        }
        Ok(())
    }

    /// Parses limits for a scope of `kind` from the wire; an empty time zone means UTC.
    pub fn from_proto(limits: Option<&pb::Limits>, kind: ScopeKind) -> Result<Self, Error> {
        let l = limits.ok_or_else(|| Error::InvalidArgument("limits are required".into()))?;
        let limits = Self {
            tokens_per_day: l.tokens_per_day,
            cost_micros_per_day: l.cost_micros_per_day,
            requests_per_minute: l.requests_per_minute,
            tokens_per_minute: l.tokens_per_minute,
            time_zone: parse_time_zone(&l.time_zone)?,
        };
        limits.validate_for(kind)?;
        Ok(limits)
    }

    pub fn to_proto(self) -> pb::Limits {
        pb::Limits {
            tokens_per_day: self.tokens_per_day,
            cost_micros_per_day: self.cost_micros_per_day,
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            time_zone: self.time_zone.map(|tz| tz.name().to_owned()).unwrap_or_default(),
        }
    }

    /// The zone of the daily window (UTC unless set).
    pub fn zone(&self) -> Tz {
        self.time_zone.unwrap_or(Tz::UTC)
    }
}

/// An IANA zone name such as `Europe/Paris`; empty is none.
pub fn parse_time_zone(name: &str) -> Result<Option<Tz>, Error> {
    if name.is_empty() {
        return Ok(None);
    }
    name.parse::<Tz>()
        .map(Some)
        .map_err(|_| Error::InvalidArgument(format!("time_zone {name:?} is not an IANA time zone name")))
}

/// A limit a reservation can hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitName {
    TokensPerDay,
    CostMicrosPerDay,
    RequestsPerMinute,
    TokensPerMinute,
}

impl LimitName {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitName::TokensPerDay => "tokens_per_day",
            LimitName::CostMicrosPerDay => "cost_micros_per_day",
            LimitName::RequestsPerMinute => "requests_per_minute",
            LimitName::TokensPerMinute => "tokens_per_minute",
        }
    }

    /// The code the stores' scripts use for it.
    pub(crate) fn from_code(code: i64) -> Option<Self> {
        match code {
            0 => Some(LimitName::TokensPerDay),
            1 => Some(LimitName::CostMicrosPerDay),
            2 => Some(LimitName::RequestsPerMinute),
            3 => Some(LimitName::TokensPerMinute),
            _ => None,
        }
    }
}

/// The daily window containing `now`: the calendar day in `zone`.
pub fn window_day(now: DateTime<Utc>, zone: Tz) -> NaiveDate {
    now.with_timezone(&zone).date_naive()
}

/// Start of the window after the one containing `now`: the next midnight in `zone`. Where a
/// daylight-saving jump skips midnight, the window starts at the first instant of the new day.
pub fn window_reset_at(now: DateTime<Utc>, zone: Tz) -> DateTime<Utc> {
    let next = window_day(now, zone).checked_add_days(Days::new(1)).unwrap_or(NaiveDate::MAX);
    (0..=3)
        .find_map(|hour| zone.from_local_datetime(&next.and_hms_opt(hour, 0, 0)?).earliest())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Whole seconds from `now` until `reset_at`, rounded up, at least 1.
pub fn retry_after_seconds(now: DateTime<Utc>, reset_at: DateTime<Utc>) -> i64 {
    retry_after_seconds_ms((reset_at - now).num_milliseconds())
}

/// Whole seconds covering `ms` milliseconds, rounded up, at least 1.
pub fn retry_after_seconds_ms(ms: i64) -> i64 {
    ((ms.max(0) + 999) / 1000).max(1)
}

/// Per-minute usage of one scope: the levels of its two leaky buckets (GCRA in its
/// continuous-state form), in requests and tokens, rounded up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MinuteState {
    pub requests: i64,
    pub tokens: i64,
}

impl MinuteState {
    /// Requests that may still start now under `limit` (0 = unlimited gives `None`).
    pub fn remaining_requests(&self, limit: i64) -> Option<i64> {
        (limit > 0).then(|| (limit - self.requests).max(0))
    }

    /// Tokens that may still be reserved now under `limit` (0 = unlimited gives `None`).
    pub fn remaining_tokens(&self, limit: i64) -> Option<i64> {
        (limit > 0).then(|| (limit - self.tokens).max(0))
    }
}

/// Counters of one scope in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterState {
    pub used_tokens: i64,
    pub reserved_tokens: i64,
    pub used_cost_micros: i64,
    pub reserved_cost_micros: i64,
    /// Commits charged in the window.
    pub requests: i64,
}

impl CounterState {
    /// Tokens left under `limit` (0 = unlimited gives `None`), floored at 0.
    pub fn remaining_tokens(&self, limit: i64) -> Option<i64> {
        (limit > 0).then(|| (limit - self.used_tokens - self.reserved_tokens).max(0))
    }

    /// Cost left under `limit` (0 = unlimited gives `None`), floored at 0.
    pub fn remaining_cost_micros(&self, limit: i64) -> Option<i64> {
        (limit > 0).then(|| (limit - self.used_cost_micros - self.reserved_cost_micros).max(0))
    }

    /// Raises each used amount to `other`'s where that is greater: used amounts only grow, so of
    /// two readings of one counter the greater is the later.
    pub fn raise_used_to(&mut self, other: &CounterState) {
        self.used_tokens = self.used_tokens.max(other.used_tokens);
        self.used_cost_micros = self.used_cost_micros.max(other.used_cost_micros);
        self.requests = self.requests.max(other.requests);
    }
}

/// Refuses a negative amount or one above `max`, naming the field.
pub(crate) fn check_amount(name: &str, value: i64, max: i64) -> Result<(), Error> {
    if value < 0 {
        Err(Error::InvalidArgument(format!("{name} must not be negative (got {value})")))
    } else if value > max {
        Err(Error::InvalidArgument(format!("{name} must be at most {max} (got {value})")))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    #[test]
    fn windows_reset_at_utc_midnight_with_exact_retry_after() {
        let now = t("2031-03-04T23:59:58.250Z");
        assert_eq!(window_day(now, Tz::UTC).to_string(), "2031-03-04");
        assert_eq!(window_reset_at(now, Tz::UTC), t("2031-03-05T00:00:00Z"));
        assert_eq!(retry_after_seconds(now, window_reset_at(now, Tz::UTC)), 2);
        let midnight = t("2031-03-05T00:00:00Z");
        assert_eq!(window_reset_at(midnight, Tz::UTC), t("2031-03-06T00:00:00Z"));
        assert_eq!(retry_after_seconds(midnight, window_reset_at(midnight, Tz::UTC)), 86_400);
        assert_eq!(retry_after_seconds(midnight, midnight), 1);
        assert_eq!(retry_after_seconds_ms(600), 1);
        assert_eq!(retry_after_seconds_ms(1_001), 2);
    }

    #[test]
    fn windows_follow_an_org_time_zone_across_daylight_saving() {
        let tokyo: Tz = "Asia/Tokyo".parse().unwrap();
        // 15:30 UTC is 00:30 the next day in Tokyo (UTC+9).
        let now = t("2031-03-04T15:30:00Z");
        assert_eq!(window_day(now, tokyo).to_string(), "2031-03-05");
        assert_eq!(window_reset_at(now, tokyo), t("2031-03-05T15:00:00Z"));
        let new_york: Tz = "America/New_York".parse().unwrap();
        // The day after the spring-forward night is 23 hours long in local terms of UTC offsets.
        assert_eq!(window_reset_at(t("2031-03-09T12:00:00Z"), new_york), t("2031-03-10T04:00:00Z"));
        assert_eq!(window_reset_at(t("2031-03-08T12:00:00Z"), new_york), t("2031-03-09T05:00:00Z"));
        // Havana skipped midnight on 2031-03-09 (DST starts at 00:00): the window starts at 01:00.
        let havana: Tz = "America/Havana".parse().unwrap();
        let reset = window_reset_at(t("2031-03-08T12:00:00Z"), havana);
        assert_eq!(window_day(reset, havana).to_string(), "2031-03-09");
        assert!(reset > t("2031-03-08T12:00:00Z"));
    }

    #[test]
    fn limits_validation() {
        assert!(Limits { tokens_per_day: 5, ..Default::default() }.validate().is_ok());
        assert!(Limits::default().validate().is_ok());
        assert!(Limits { requests_per_minute: 100, tokens_per_minute: 9, ..Default::default() }.validate().is_ok());
        assert!(matches!(
            Limits { tokens_per_day: -1, ..Default::default() }.validate(),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Limits { cost_micros_per_day: MAX_COST_MICROS + 1, ..Default::default() }.validate(),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Limits { requests_per_minute: MAX_PER_MINUTE + 1, ..Default::default() }.validate(),
            Err(Error::InvalidArgument(_))
        ));
        let zoned = pb::Limits { time_zone: "Europe/Paris".into(), ..Default::default() };
        assert_eq!(Limits::from_proto(Some(&zoned), ScopeKind::Org).unwrap().zone().name(), "Europe/Paris");
        assert!(matches!(Limits::from_proto(Some(&zoned), ScopeKind::User), Err(Error::InvalidArgument(_))));
        let bad = pb::Limits { time_zone: "Mars/Olympus".into(), ..Default::default() };
        assert!(matches!(Limits::from_proto(Some(&bad), ScopeKind::Org), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn principal_scopes_broadest_first_and_required_fields() {
        let p = Principal {
            org_id: "o".into(),
            project_id: "p".into(),
            user_id: String::new(),
            key_id: "k".into(),
            role: 0,
        };
        let scopes = Scope::of_principal(Some(&p)).unwrap();
        let names: Vec<String> = scopes.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["org:o", "project:p", "key:k"]);
        assert!(Scope::of_principal(None).is_err());
        assert!(Scope::of_principal(Some(&Principal { key_id: String::new(), ..p.clone() })).is_err());
        assert!(Scope::of_principal(Some(&Principal { project_id: String::new(), ..p.clone() })).is_err());
        assert!(Scope::of_principal(Some(&Principal { org_id: "a\nb".into(), ..p })).is_err());
    }

    #[test]
    fn unspecified_scope_kind_is_invalid() {
        let scope = pb::Scope { kind: 0, id: "x".into() };
        assert!(matches!(Scope::from_proto(Some(&scope)), Err(Error::InvalidArgument(_))));
        let scope = pb::Scope { kind: 99, id: "x".into() };
        assert!(matches!(Scope::from_proto(Some(&scope)), Err(Error::InvalidArgument(_))));
        let scope = pb::Scope { kind: pb::ScopeKind::Key as i32, id: String::new() };
        assert!(matches!(Scope::from_proto(Some(&scope)), Err(Error::InvalidArgument(_))));
    }
}
