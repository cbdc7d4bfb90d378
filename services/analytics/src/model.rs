//! Trace rows, query shapes and the aggregate arithmetic shared by both stores, so the in-memory
//! store answers exactly what Postgres answers.

use chrono::{DateTime, Datelike, Days, SubsecRound, Utc};
use meshgate_proto::analytics::v1 as pb;
use meshgate_proto::common::v1::Layer;

use crate::Error;
use crate::hist::Spend;

/// Longest request id, org id or other identifier accepted, bytes.
pub const MAX_ID_LEN: usize = 256;

/// The queryable columns of one trace, and the trace itself.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRow {
    /// Truncated to microseconds, the precision of `timestamptz`, so both stores agree on the day.
    pub started_at: DateTime<Utc>,
    pub org_id: String,
    pub request_id: String,
    pub trace_id: String,
    pub project_id: String,
    pub user_id: String,
    pub key_id: String,
    pub requested_model: String,
    pub served_model: String,
    pub served_target: String,
    /// "l0".."l3", or "" when unknown.
    pub layer: &'static str,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub cost_micros: i64,
    /// Of `prompt_tokens`, read from and written to the provider's prompt cache.
    pub cached_prompt_tokens: i64,
    pub cache_write_tokens: i64,
    /// Of `completion_tokens`, spent reasoning.
    pub reasoning_tokens: i64,
    pub latency_us: i64,
    pub status_code: i32,
    pub error_code: String,
    pub stream: bool,
    pub task: String,
    pub risk_score: i32,
    /// The trace as stored (sensitive headers removed).
    pub trace: pb::Trace,
}

/// Headers never stored even when a client of Record forgets to strip them.
const SECRET_HEADERS: [&str; 7] =
    ["authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key", "openai-api-key"];
/// Most headers, model calls, findings, tool calls and routing reasons one trace may carry.
pub const MAX_LIST_LEN: usize = 256;
/// Longest header value or routing reason stored, bytes.
pub const MAX_TEXT_LEN: usize = 8 * 1024;

fn check_id(what: &str, id: &str, required: bool) -> Result<(), Error> {
    if required && id.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is required")));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Error::InvalidArgument(format!("{what} is longer than {MAX_ID_LEN} bytes")));
    }
    if id.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!("{what} contains control characters")));
    }
    Ok(())
}

/// Removes NUL from `text`.
fn strip(text: &mut String) {
    if text.contains('\0') {
        text.retain(|c| c != '\0');
    }
}

/// Removes NUL from every free-text field of a trace (identifiers are checked, not changed).
fn strip_nul(trace: &mut pb::Trace) {
    strip(&mut trace.routing_reason);
    trace.routing_reasons.iter_mut().for_each(strip);
    trace.dropped_params.iter_mut().for_each(strip);
    for tool in &mut trace.tool_calls {
        strip(&mut tool.name);
        strip(&mut tool.kind);
    }
    if trace.headers.iter().any(|(name, value)| name.contains('\0') || value.contains('\0')) {
        trace.headers = std::mem::take(&mut trace.headers)
            .into_iter()
            .map(|(mut name, mut value)| {
                strip(&mut name);
                strip(&mut value);
                (name, value)
            })
            .collect();
    }
    for call in &mut trace.calls {
        for text in [&mut call.target_id, &mut call.provider, &mut call.model, &mut call.status] {
            strip(text);
        }
        if let Some(error) = &mut call.error {
            strip(&mut error.code);
            strip(&mut error.message);
        }
    }
    for finding in &mut trace.findings {
        for text in [
            &mut finding.direction,
            &mut finding.rule,
            &mut finding.category,
            &mut finding.severity,
            &mut finding.action,
        ] {
            strip(text);
        }
    }
    if let Some(error) = &mut trace.error {
        strip(&mut error.code);
        strip(&mut error.message);
    }
}

fn check_non_negative(what: &str, value: i64, request_id: &str) -> Result<(), Error> {
    if value < 0 {
        return Err(Error::InvalidArgument(format!("trace {request_id}: {what} must not be negative")));
    }
    Ok(())
}

/// A timestamp from the wire, or `None` when out of range.
pub fn from_timestamp(ts: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(ts.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    DateTime::from_timestamp(ts.seconds, nanos)
}

pub fn to_timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0) }
}

/// Short name of a cost layer in rows and group keys.
pub fn layer_name(layer: i32) -> &'static str {
    Layer::short_name_of(layer)
}

impl TraceRow {
    /// Validates a received trace and extracts its columns. NUL, which no Postgres text or jsonb
    /// value can hold, is removed from the free text (tool names, headers, routing reasons, model
    /// calls, findings, the error); identifiers with control characters refuse the trace.
    pub fn from_trace(mut trace: pb::Trace) -> Result<Self, Error> {
        strip_nul(&mut trace);
        check_id("trace.request_id", &trace.request_id, true)?;
        let rid = trace.request_id.clone();
        let principal = trace.principal.clone().unwrap_or_default();
        check_id("trace.principal.org_id", &principal.org_id, true)?;
        for (what, id) in [
            ("trace.principal.project_id", &principal.project_id),
            ("trace.principal.user_id", &principal.user_id),
            ("trace.principal.key_id", &principal.key_id),
            ("trace.trace_id", &trace.trace_id),
            ("trace.requested_model", &trace.requested_model),
            ("trace.served_model", &trace.served_model),
            ("trace.served_target", &trace.served_target),
            ("trace.task", &trace.task),
        ] {
            check_id(what, id, false)?;
        }
        for (what, len) in [
            ("calls", trace.calls.len()),
            ("findings", trace.findings.len()),
            ("tool_calls", trace.tool_calls.len()),
            ("routing_reasons", trace.routing_reasons.len()),
            ("headers", trace.headers.len()),
            ("dropped_params", trace.dropped_params.len()),
        ] {
            if len > MAX_LIST_LEN {
                return Err(Error::InvalidArgument(format!("trace {rid}: more than {MAX_LIST_LEN} {what}")));
            }
        }
        let texts = trace
            .routing_reasons
            .iter()
            .chain(std::iter::once(&trace.routing_reason))
            .chain(trace.headers.values())
            .chain(&trace.dropped_params);
        if texts.chain(trace.headers.keys()).any(|t| t.len() > MAX_TEXT_LEN) {
            return Err(Error::InvalidArgument(format!(
                "trace {rid}: a routing reason, header or dropped parameter is longer than {MAX_TEXT_LEN} bytes"
            )));
        }
        for call in &trace.calls {
            let usage = call.usage.unwrap_or_default();
            for (what, value) in [
                ("calls.latency_us", call.latency_us),
                ("calls.usage.prompt_tokens", usage.prompt_tokens),
                ("calls.usage.completion_tokens", usage.completion_tokens),
                ("calls.usage.cost_micros", usage.cost_micros),
            ] {
                check_non_negative(what, value, &rid)?;
            }
        }
        if trace.risk_score > 100 {
            return Err(Error::InvalidArgument(format!("trace {rid}: risk_score must be at most 100")));
        }
        trace.headers.retain(|name, _| !SECRET_HEADERS.contains(&name.to_ascii_lowercase().as_str()));
        let started_at = trace
            .started_at
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument(format!("trace {rid}: started_at is required")))
            .and_then(|ts| {
                from_timestamp(ts)
                    .ok_or_else(|| Error::InvalidArgument(format!("trace {rid}: started_at is out of range")))
            })?
            .trunc_subsecs(6);
        let usage = trace.usage.unwrap_or_default();
        for (what, value) in [
            ("usage.prompt_tokens", usage.prompt_tokens),
            ("usage.completion_tokens", usage.completion_tokens),
            ("usage.total_tokens", usage.total_tokens),
            ("usage.cost_micros", usage.cost_micros),
            ("usage.cached_prompt_tokens", usage.cached_prompt_tokens),
            ("usage.cache_write_tokens", usage.cache_write_tokens),
            ("usage.reasoning_tokens", usage.reasoning_tokens),
            ("latency_us", trace.latency_us),
        ] {
            check_non_negative(what, value, &rid)?;
        }
        if !(0..=999).contains(&trace.status_code) {
            return Err(Error::InvalidArgument(format!(
                "trace {rid}: status_code {} is not an HTTP status",
                trace.status_code
            )));
        }
        let total_tokens = usage.tokens();
        Ok(Self {
            started_at,
            org_id: principal.org_id,
            request_id: rid,
            trace_id: trace.trace_id.clone(),
            project_id: principal.project_id,
            user_id: principal.user_id,
            key_id: principal.key_id,
            requested_model: trace.requested_model.clone(),
            served_model: trace.served_model.clone(),
            served_target: trace.served_target.clone(),
            layer: layer_name(trace.layer),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens,
            cost_micros: usage.cost_micros,
            cached_prompt_tokens: usage.cached_prompt_tokens,
            cache_write_tokens: usage.cache_write_tokens,
            reasoning_tokens: usage.reasoning_tokens,
            latency_us: trace.latency_us,
            status_code: trace.status_code,
            error_code: trace.error.as_ref().map(|e| e.code.clone()).unwrap_or_default(),
            stream: trace.stream,
            task: trace.task.clone(),
            risk_score: i32::try_from(trace.risk_score).unwrap_or(100),
            trace,
        })
    }

    /// What the request spent, for the sums.
    pub fn spend(&self) -> Spend {
        Spend {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_prompt_tokens: self.cached_prompt_tokens,
            cache_write_tokens: self.cache_write_tokens,
            reasoning_tokens: self.reasoning_tokens,
            cost_micros: self.cost_micros,
        }
    }

    /// The model that answered, else the one asked for (the `model` column).
    pub fn model(&self) -> &str {
        if self.served_model.is_empty() { &self.requested_model } else { &self.served_model }
    }

    /// An HTTP error status or an error code (the `is_error` column).
    pub fn is_error(&self) -> bool {
        self.status_code >= 400 || !self.error_code.is_empty()
    }
}

/// A time range, `from` inclusive and `to` exclusive; an absent bound is open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeWindow {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

impl TimeWindow {
    pub fn from_proto(range: Option<&pb::TimeRange>) -> Result<Self, Error> {
        let Some(range) = range else { return Ok(Self::default()) };
        let bound = |ts: Option<&prost_types::Timestamp>, name: &str| {
            ts.map(|ts| {
                from_timestamp(ts).ok_or_else(|| Error::InvalidArgument(format!("range.{name} is out of range")))
            })
            .transpose()
        };
        let window = Self { from: bound(range.from.as_ref(), "from")?, to: bound(range.to.as_ref(), "to")? };
        if let (Some(from), Some(to)) = (window.from, window.to)
            && from >= to
        {
            return Err(Error::InvalidArgument("range.from must be before range.to".into()));
        }
        Ok(window)
    }

    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        self.from.is_none_or(|from| t >= from) && self.to.is_none_or(|to| t < to)
    }
}

/// How Query groups rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// One total row with an empty key.
    Total,
    /// `YYYY-MM-DD` (UTC).
    Day,
    /// Monday of the ISO week, `YYYY-MM-DD` (UTC).
    Week,
    /// `YYYY-MM` (UTC).
    Month,
    Model,
    Layer,
    User,
    Project,
}

impl GroupBy {
    pub fn parse(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "" => GroupBy::Total,
            "day" => GroupBy::Day,
            "week" => GroupBy::Week,
            "month" => GroupBy::Month,
            "model" => GroupBy::Model,
            "layer" => GroupBy::Layer,
            "user" => GroupBy::User,
            "project" => GroupBy::Project,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "group_by {other:?} is not one of day, week, month, model, layer, user, project"
                )));
            }
        })
    }

    /// The group key of a row (must match the SQL expression of the Postgres store).
    pub fn key(self, row: &TraceRow) -> String {
        let day = row.started_at.date_naive();
        match self {
            GroupBy::Total => String::new(),
            GroupBy::Day => day.format("%Y-%m-%d").to_string(),
            GroupBy::Week => day
                .checked_sub_days(Days::new(u64::from(day.weekday().num_days_from_monday())))
                .unwrap_or(day)
                .format("%Y-%m-%d")
                .to_string(),
            GroupBy::Month => day.format("%Y-%m").to_string(),
            GroupBy::Model => row.model().to_owned(),
            GroupBy::Layer => row.layer.to_owned(),
            GroupBy::User => row.user_id.clone(),
            GroupBy::Project => row.project_id.clone(),
        }
    }
}

/// Longest list of project ids a scope may carry.
pub const MAX_SCOPE_PROJECTS: usize = 1_000;

/// The caller's tenancy: one organization and, unless empty, only these projects of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scope {
    pub org_id: String,
    /// Empty: the whole organization.
    pub project_ids: Vec<String>,
}

impl Scope {
    /// The scope of a read: an organization and either its projects `project_ids` or, asked for
    /// explicitly with `all_projects`, all of them. Neither (or both) is refused: an empty list
    /// never stands for "everything".
    pub fn from_proto(org_id: &str, project_ids: &[String], all_projects: bool) -> Result<Self, Error> {
        check_id("org_id", org_id, true)?;
        match (project_ids.is_empty(), all_projects) {
            (true, false) => {
                return Err(Error::InvalidArgument(
                    "project_ids is required (or all_projects, for the whole organization)".into(),
                ));
            }
            (false, true) => {
                return Err(Error::InvalidArgument("project_ids and all_projects exclude each other".into()));
            }
            _ => {}
        }
        if project_ids.len() > MAX_SCOPE_PROJECTS {
            return Err(Error::InvalidArgument(format!("project_ids holds at most {MAX_SCOPE_PROJECTS} ids")));
        }
        for id in project_ids {
            check_id("project_ids", id, true)?;
        }
        Ok(Self { org_id: org_id.to_owned(), project_ids: project_ids.to_vec() })
    }

    /// The whole organization.
    pub fn org(org_id: &str) -> Self {
        Self { org_id: org_id.to_owned(), project_ids: Vec::new() }
    }

    pub fn allows(&self, org_id: &str, project_id: &str) -> bool {
        self.org_id == org_id && (self.project_ids.is_empty() || self.project_ids.iter().any(|p| p == project_id))
    }
}

/// Optional exact-match filters of an aggregation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filters {
    pub project_id: Option<String>,
    pub user_id: Option<String>,
    pub model: Option<String>,
    /// "l0".."l3".
    pub layer: Option<String>,
}

impl Filters {
    pub fn from_proto(project_id: &str, user_id: &str, model: &str, layer: &str) -> Result<Self, Error> {
        let optional = |what: &str, v: &str| -> Result<Option<String>, Error> {
            check_id(what, v, false)?;
            Ok((!v.is_empty()).then(|| v.to_owned()))
        };
        if !["", "l0", "l1", "l2", "l3"].contains(&layer) {
            return Err(Error::InvalidArgument(format!("layer {layer:?} is not one of l0, l1, l2, l3")));
        }
        Ok(Self {
            project_id: optional("project_id", project_id)?,
            user_id: optional("user_id", user_id)?,
            model: optional("model", model)?,
            layer: optional("layer", layer)?,
        })
    }
}

/// An aggregation over the traces a scope may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceQuery {
    pub scope: Scope,
    pub filters: Filters,
    pub window: TimeWindow,
    pub group_by: GroupBy,
}

impl TraceQuery {
    pub fn from_proto(req: &pb::QueryRequest) -> Result<Self, Error> {
        Ok(Self {
            scope: Scope::from_proto(&req.org_id, &req.project_ids, req.all_projects)?,
            filters: Filters::from_proto(&req.project_id, &req.user_id, &req.model, &req.layer)?,
            window: TimeWindow::from_proto(req.range.as_ref())?,
            group_by: GroupBy::parse(&req.group_by)?,
        })
    }

    /// Totals of everything `scope` may see in `window`.
    pub fn total(scope: Scope, window: TimeWindow) -> Self {
        Self { scope, filters: Filters::default(), window, group_by: GroupBy::Total }
    }

    pub fn matches(&self, row: &TraceRow) -> bool {
        let f = &self.filters;
        self.scope.allows(&row.org_id, &row.project_id)
            && f.project_id.as_ref().is_none_or(|p| *p == row.project_id)
            && f.user_id.as_ref().is_none_or(|u| *u == row.user_id)
            && f.model.as_ref().is_none_or(|m| m == row.model())
            && f.layer.as_ref().is_none_or(|l| l == row.layer)
            && self.window.contains(row.started_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_keys() {
        let trace = pb::Trace {
            request_id: "r".into(),
            principal: Some(meshgate_proto::common::v1::Principal { org_id: "o".into(), ..Default::default() }),
            // 2031-01-08 is a Wednesday.
            started_at: Some(prost_types::Timestamp { seconds: 1_925_640_000, nanos: 999_999_999 }),
            requested_model: "asked".into(),
            layer: Layer::L2Standard as i32,
            ..Default::default()
        };
        let row = TraceRow::from_trace(trace).unwrap();
        assert_eq!(row.started_at.to_rfc3339(), "2031-01-08T12:00:00.999999+00:00");
        assert_eq!(GroupBy::Day.key(&row), "2031-01-08");
        assert_eq!(GroupBy::Week.key(&row), "2031-01-06");
        assert_eq!(GroupBy::Month.key(&row), "2031-01");
        assert_eq!(GroupBy::Model.key(&row), "asked");
        assert_eq!(GroupBy::Layer.key(&row), "l2");
        assert!(GroupBy::parse("hour").is_err());
    }

    #[test]
    fn secret_headers_are_never_stored() {
        let trace = pb::Trace {
            request_id: "r".into(),
            principal: Some(meshgate_proto::common::v1::Principal { org_id: "o".into(), ..Default::default() }),
            started_at: Some(prost_types::Timestamp { seconds: 1_900_000_000, nanos: 0 }),
            headers: [("Authorization", "Bearer mgk_x"), ("cookie", "s=1"), ("X-Api-Key", "k"), ("user-agent", "ua")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ..Default::default()
        };
        let row = TraceRow::from_trace(trace).unwrap();
        assert_eq!(row.trace.headers.keys().collect::<Vec<_>>(), ["user-agent"]);
    }

    #[test]
    fn nul_is_stripped_from_free_text_and_refuses_identifiers() {
        let trace = pb::Trace {
            request_id: "r".into(),
            principal: Some(meshgate_proto::common::v1::Principal { org_id: "o".into(), ..Default::default() }),
            started_at: Some(prost_types::Timestamp { seconds: 1_900_000_000, nanos: 0 }),
            tool_calls: vec![pb::ToolCall { name: "get\0weather".into(), kind: "offered".into() }],
            headers: [("x-n\0".to_owned(), "a\0b".to_owned())].into_iter().collect(),
            routing_reasons: vec!["why\0".into()],
            dropped_params: vec!["top\0_k".into()],
            ..Default::default()
        };
        let row = TraceRow::from_trace(trace.clone()).unwrap();
        assert_eq!(row.trace.dropped_params, ["top_k"]);
        assert_eq!(row.trace.tool_calls[0].name, "getweather");
        assert_eq!(row.trace.headers.get("x-n").map(String::as_str), Some("ab"));
        assert_eq!(row.trace.routing_reasons, ["why"]);
        let bad_model = pb::Trace { served_model: "m\0".into(), ..trace };
        assert!(matches!(TraceRow::from_trace(bad_model), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn a_scope_names_its_projects_or_asks_for_all_of_them() {
        assert_eq!(Scope::from_proto("o", &["p".into()], false).unwrap().project_ids, ["p"]);
        assert!(Scope::from_proto("o", &[], true).unwrap().project_ids.is_empty());
        for (projects, all) in [(vec![], false), (vec!["p".to_owned()], true), (vec![String::new()], false)] {
            assert!(matches!(Scope::from_proto("o", &projects, all), Err(Error::InvalidArgument(_))), "{projects:?}");
        }
        assert!(matches!(Scope::from_proto("", &[], true), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn invalid_traces_are_refused() {
        let ok = pb::Trace {
            request_id: "r".into(),
            principal: Some(meshgate_proto::common::v1::Principal { org_id: "o".into(), ..Default::default() }),
            started_at: Some(prost_types::Timestamp { seconds: 1_900_000_000, nanos: 0 }),
            ..Default::default()
        };
        assert!(TraceRow::from_trace(ok.clone()).is_ok());
        let cases = [
            pb::Trace { request_id: String::new(), ..ok.clone() },
            pb::Trace { principal: None, ..ok.clone() },
            pb::Trace { started_at: None, ..ok.clone() },
            pb::Trace { started_at: Some(prost_types::Timestamp { seconds: 0, nanos: -1 }), ..ok.clone() },
            pb::Trace { latency_us: -1, ..ok.clone() },
            pb::Trace { status_code: 1000, ..ok.clone() },
            pb::Trace { risk_score: 101, ..ok.clone() },
            pb::Trace { task: "x".repeat(MAX_ID_LEN + 1), ..ok.clone() },
            pb::Trace { routing_reasons: vec!["r".into(); MAX_LIST_LEN + 1], ..ok.clone() },
            pb::Trace { request_id: "a\0b".into(), ..ok },
        ];
        for trace in cases {
            assert!(matches!(TraceRow::from_trace(trace.clone()), Err(Error::InvalidArgument(_))), "{trace:?}");
        }
    }
}
