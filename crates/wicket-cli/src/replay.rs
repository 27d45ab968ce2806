//! `wicket sessions replay` and `wicket sessions search`: play a session
//! back (terminal recordings at their own pace, everything else as a
//! timeline of commands, decisions, approvals and reasoning) and find
//! events across sessions.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use wicket_proto::convert;
use wicket_proto::v1;
use wicket_proto::v1::session_admin_service_client::SessionAdminServiceClient;

use crate::commands::{
    Client, command_json, decision_json, effect, kind_name, principal_label, reasoning_json,
    reasoning_text, result_cell, session_events, time,
};
use crate::output::{self, Format, cell};
use crate::{Cli, CliError};

/// How `replay` shows a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplayFormat {
    /// Play the terminal recording in this terminal.
    Terminal,
    /// Write the terminal recording as asciicast v2 (for `asciinema play`).
    Asciicast,
    /// Print the commands with their decisions, approvals, results and
    /// reasoning.
    Timeline,
}

/// How to replay.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Session id.
    pub id: String,
    /// Playback speed (2: twice as fast).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Pauses longer than this many seconds are cut to it (0 keeps them).
    #[arg(long, default_value_t = 2.0)]
    pub idle_limit: f64,
    /// The terminal channel, when the session recorded several.
    #[arg(long)]
    pub channel: Option<String>,
    /// terminal (default when the session has a terminal recording),
    /// asciicast, or timeline (the default otherwise).
    #[arg(long, value_enum)]
    pub format: Option<ReplayFormat>,
}

/// What to search for.
#[derive(Debug, Clone, clap::Args)]
pub struct SearchArgs {
    /// Text anywhere in the event: command, details, reasoning (any case).
    pub text: Option<String>,
    /// The session's principal (subject or display name).
    #[arg(long)]
    pub principal: Option<String>,
    /// Connection name.
    #[arg(long)]
    pub connection: Option<String>,
    /// allow, review or deny (the decision); approved, denied, expired or
    /// covered (an approval's outcome).
    #[arg(long, value_parser = ["allow", "review", "deny", "approved", "denied", "expired", "covered"])]
    pub decision: Option<String>,
    /// From this time: RFC 3339 (`2026-11-24T09:00:00Z`) or a duration ago
    /// (`90m`, `2h`, `7d`).
    #[arg(long)]
    pub since: Option<String>,
    /// Before this time (same forms).
    #[arg(long)]
    pub until: Option<String>,
    /// At most this many (up to 1000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
}

/// A terminal recording: asciicast v2 header and event lines.
pub struct Cast {
    /// The header line.
    pub header: String,
    /// The event lines, newline-terminated.
    pub lines: String,
}

/// The terminal recording of `channel` (or the only one) among `events`;
/// `Ok(None)` when the session has none.
pub fn cast_of(
    id: &str,
    events: &[v1::AuditEvent],
    channel: Option<&str>,
) -> Result<Option<Cast>, CliError> {
    // Each recorded channel: its header, then its event lines, in order.
    let mut casts: BTreeMap<String, (Option<String>, String)> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e.kind == v1::AuditKind::Output as i32)
    {
        let Some(ch) = e.details.get("channel") else {
            continue;
        };
        if channel.is_none_or(|c| c == ch)
            && let Some(why) = e.details.get("asciicast_error")
        {
            return Err(CliError::failed(format!(
                "session {id} cannot be played back whole: event {}: {why}",
                e.id
            )));
        }
        let cast = casts.entry(ch.clone()).or_default();
        if let Some(h) = e.details.get("asciicast_header") {
            cast.0 = Some(h.clone());
        }
        if let Some(lines) = e.details.get("asciicast") {
            cast.1.push_str(lines);
        }
    }
    casts.retain(|_, (h, _)| h.is_some());
    let (header, lines) = match channel {
        Some(ch) => casts.remove(ch).ok_or_else(|| {
            CliError::usage(format!("session {id} has no recording of channel {ch}"))
        })?,
        None if casts.is_empty() => return Ok(None),
        None if casts.len() == 1 => casts.pop_first().map(|(_, c)| c).unwrap_or_default(),
        None => {
            return Err(CliError::usage(format!(
                "session {id} recorded several channels ({}); pick one with --channel",
                casts.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
    };
    Ok(Some(Cast {
        header: header.unwrap_or_default(),
        lines,
    }))
}

/// The pauses and output of a recording's event lines: `(pause before,
/// output)`, pauses cut to `idle_limit` (unless 0) and divided by `speed`.
/// Input and resize events are not shown; their time counts.
fn schedule(lines: &str, speed: f64, idle_limit: f64) -> Vec<(Duration, String)> {
    let mut out = Vec::new();
    let mut last = 0.0f64;
    for line in lines.lines() {
        let Ok(Value::Array(v)) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let (Some(t), Some("o"), Some(data)) = (
            v.first().and_then(Value::as_f64),
            v.get(1).and_then(Value::as_str),
            v.get(2).and_then(Value::as_str),
        ) else {
            continue;
        };
        let mut gap = (t - last).max(0.0);
        if idle_limit > 0.0 {
            gap = gap.min(idle_limit);
        }
        last = last.max(t);
        out.push((Duration::from_secs_f64(gap / speed), data.to_string()));
    }
    out
}

/// Plays a recording to standard output.
async fn play(cast: &Cast, speed: f64, idle_limit: f64) -> Result<(), CliError> {
    let mut stdout = std::io::stdout();
    for (pause, data) in schedule(&cast.lines, speed, idle_limit) {
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        stdout
            .write_all(data.as_bytes())
            .and_then(|_| stdout.flush())
            .map_err(|e| CliError::usage(format!("cannot write to the terminal: {e}")))?;
    }
    Ok(())
}

/// Prints a session as a timeline.
fn timeline(fmt: Format, s: &v1::Session, events: &[v1::AuditEvent]) {
    let start = events
        .iter()
        .filter_map(|e| convert::from_ts(e.time.as_ref()))
        .min();
    let offset = |e: &v1::AuditEvent| match (start, convert::from_ts(e.time.as_ref())) {
        (Some(a), Some(b)) => (b - a).num_milliseconds() as f64 / 1000.0,
        _ => 0.0,
    };
    // Results reported apart from their command sit with it.
    let results: HashMap<&str, &v1::AuditEvent> = events
        .iter()
        .filter(|e| e.kind == v1::AuditKind::CommandResult as i32)
        .filter_map(|e| Some((e.details.get("command_id")?.as_str(), e)))
        .collect();
    let shown: Vec<&v1::AuditEvent> = events
        .iter()
        .filter(|e| {
            e.kind != v1::AuditKind::CommandResult as i32 && e.kind != v1::AuditKind::Output as i32
        })
        .collect();
    if fmt != Format::Table {
        let items: Vec<Value> = shown
            .iter()
            .map(|e| {
                let result = results.get(e.id.as_str()).map(|r| &r.details).unwrap_or(&e.details);
                json!({
                    "offset_seconds": offset(e), "time": time(e.time.as_ref()), "kind": kind_name(e.kind),
                    "command": command_json(e.command.as_ref()), "decision": decision_json(e.decision.as_ref()),
                    "approval": e.details.get("approval"), "approval_outcome": e.details.get("approval_outcome"),
                    "result": result_cell(result), "reasoning": reasoning_json(e.reasoning.as_ref()),
                    "traceparent": e.traceparent, "end_reason": e.end_reason,
                })
            })
            .collect();
        output::json(fmt, &Value::Array(items));
        return;
    }
    println!(
        "session {} · {} · {} · {} {}",
        s.id,
        s.connection,
        principal_label(s.principal.as_ref()),
        s.client_app,
        s.client_addr
    );
    let outputs = events
        .iter()
        .filter(|e| e.kind == v1::AuditKind::Output as i32)
        .count();
    if outputs > 0 {
        println!("({outputs} terminal output events: `--format terminal` plays them)");
    }
    let mut last_reasoning = String::new();
    for e in shown {
        let at = format!("+{:>9.3}s", offset(e));
        let what = match v1::AuditKind::try_from(e.kind) {
            Ok(v1::AuditKind::SessionStart) => format!("session start {}", time(e.time.as_ref())),
            Ok(v1::AuditKind::SessionEnd) => format!("session end ({})", e.end_reason),
            Ok(v1::AuditKind::Command) => {
                let decided = match &e.decision {
                    Some(d) => format!("{} ({})", effect(d.effect), d.rule),
                    None => "(no decision)".into(),
                };
                let mut line = format!(
                    "{decided}  {}",
                    cell(
                        &e.command
                            .as_ref()
                            .map(|c| c.text.clone())
                            .unwrap_or_default(),
                        200
                    )
                );
                if let (Some(a), Some(o)) =
                    (e.details.get("approval"), e.details.get("approval_outcome"))
                {
                    line.push_str(&format!("  [approval {a}: {o}]"));
                }
                let result = results
                    .get(e.id.as_str())
                    .map(|r| &r.details)
                    .unwrap_or(&e.details);
                let r = result_cell(result);
                if !r.is_empty() {
                    line.push_str(&format!("  → {r}"));
                }
                line
            }
            _ => {
                let mut line = kind_name(e.kind);
                if let Some(c) = &e.command {
                    line.push_str(&format!("  {}", cell(&c.text, 200)));
                }
                line
            }
        };
        println!("{at}  {what}");
        // A reasoning is printed where it changes, not on every command.
        let reasoning = reasoning_text(e.reasoning.as_ref());
        if !reasoning.is_empty() && reasoning != last_reasoning {
            println!("{:>11}  reasoning: {}", "", cell(&reasoning, 400));
            last_reasoning = reasoning;
        }
    }
}

/// Runs `wicket sessions replay`.
pub async fn replay(cli: &Cli, fmt: Format, a: &ReplayArgs) -> Result<(), CliError> {
    if !(a.speed.is_finite() && a.speed > 0.0) {
        return Err(CliError::usage("--speed must be a positive number"));
    }
    if !(a.idle_limit.is_finite() && a.idle_limit >= 0.0) {
        return Err(CliError::usage("--idle-limit must be 0 or more seconds"));
    }
    let c = Client::connect(cli).await?;
    let mut api = SessionAdminServiceClient::new(c.channel.clone());
    let s = api
        .get_session(c.req(v1::GetSessionRequest { id: a.id.clone() }))
        .await?
        .into_inner();
    let events = session_events(&c, &mut api, &a.id).await?;
    let cast = cast_of(&a.id, &events, a.channel.as_deref())?;
    let format = a.format.unwrap_or(if cast.is_some() {
        ReplayFormat::Terminal
    } else {
        ReplayFormat::Timeline
    });
    match (format, cast) {
        (ReplayFormat::Timeline, _) => timeline(fmt, &s, &events),
        (ReplayFormat::Asciicast, Some(cast)) => print!("{}\n{}", cast.header, cast.lines),
        (ReplayFormat::Terminal, Some(cast)) => play(&cast, a.speed, a.idle_limit).await?,
        (_, None) => {
            return Err(CliError::usage(format!(
                "session {} has no terminal recording; `--format timeline` shows its commands",
                a.id
            )));
        }
    }
    Ok(())
}

/// A time given as RFC 3339 or as a duration before `now`.
fn parse_time(s: &str, now: DateTime<Utc>, flag: &str) -> Result<DateTime<Utc>, CliError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    wicket_core::parse_seconds(s)
        .map(|secs| now - chrono::Duration::seconds(i64::from(secs)))
        .map_err(|_| {
            CliError::usage(format!(
                "{flag} `{s}`: give an RFC 3339 time (2026-11-24T09:00:00Z) or a duration ago (90m, 2h, 7d)"
            ))
        })
}

/// Runs `wicket sessions search`.
pub async fn search(cli: &Cli, fmt: Format, a: &SearchArgs) -> Result<(), CliError> {
    let now = Utc::now();
    let since = a
        .since
        .as_deref()
        .map(|s| parse_time(s, now, "--since"))
        .transpose()?;
    let until = a
        .until
        .as_deref()
        .map(|s| parse_time(s, now, "--until"))
        .transpose()?;
    let c = Client::connect(cli).await?;
    let events = SessionAdminServiceClient::new(c.channel.clone())
        .search_events(c.req(v1::SearchEventsRequest {
            text: a.text.clone().unwrap_or_default(),
            principal: a.principal.clone().unwrap_or_default(),
            connection: a.connection.clone().unwrap_or_default(),
            decision: a.decision.clone().unwrap_or_default(),
            since: since.map(convert::ts),
            until: until.map(convert::ts),
            limit: a.limit,
        }))
        .await?
        .into_inner()
        .events;
    let rows = events
        .iter()
        .map(|e| {
            let d = e.decision.as_ref();
            vec![
                time(e.time.as_ref()),
                e.session_id.clone(),
                principal_label(e.principal.as_ref()),
                e.connection.clone(),
                kind_name(e.kind),
                d.map(|d| format!("{} ({})", effect(d.effect), d.rule))
                    .unwrap_or_default(),
                cell(
                    &e.command
                        .as_ref()
                        .map(|c| c.text.clone())
                        .unwrap_or_default(),
                    60,
                ),
            ]
        })
        .collect();
    let json = events
        .iter()
        .map(|e| {
            json!({
                "id": e.id, "session_id": e.session_id, "seq": e.seq, "time": time(e.time.as_ref()),
                "kind": kind_name(e.kind), "connection": e.connection,
                "principal": principal_label(e.principal.as_ref()),
                "command": command_json(e.command.as_ref()), "decision": decision_json(e.decision.as_ref()),
                "reasoning": reasoning_json(e.reasoning.as_ref()), "details": e.details,
            })
        })
        .collect();
    output::rows(
        fmt,
        &[
            "time",
            "session",
            "principal",
            "connection",
            "event",
            "decision",
            "command",
        ],
        rows,
        Value::Array(json),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_are_cut_to_the_idle_limit_and_scaled_by_speed() {
        let lines = "[0.5,\"o\",\"a\"]\n[0.7,\"i\",\"x\"]\n[30.5,\"o\",\"b\"]\nnot json\n[31.0,\"r\",\"80x24\"]\n[31.5,\"o\",\"c\"]\n";
        let s = schedule(lines, 1.0, 2.0);
        assert_eq!(
            s,
            [
                (Duration::from_millis(500), "a".to_string()),
                (Duration::from_secs(2), "b".to_string()),
                (Duration::from_secs(1), "c".to_string()),
            ]
        );
        let fast = schedule(lines, 4.0, 0.0);
        assert_eq!(fast[1].0, Duration::from_millis(7500));
    }

    #[test]
    fn times_are_rfc_3339_or_durations_ago() {
        let now = Utc::now();
        assert_eq!(
            parse_time("2h", now, "--since").unwrap(),
            now - chrono::Duration::hours(2)
        );
        assert_eq!(
            parse_time("2026-11-24T09:00:00+01:00", now, "--since")
                .unwrap()
                .to_rfc3339(),
            "2026-11-24T08:00:00+00:00"
        );
        assert!(parse_time("yesterday", now, "--since").is_err());
    }
}
