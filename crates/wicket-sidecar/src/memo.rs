//! Per-session memo of policy decisions.
//!
//! A session asks the same questions again and again (the same statement
//! with other constants, the same prepared statement executed once per
//! row). Under one policy bundle, for one principal, a decision is a pure
//! function of the command's classification, whether a reasoning trace was
//! given, the command's text when a condition reads it, and the time only
//! through grant expiry or a condition reading `now`. The memo keys on
//! exactly those inputs, is dropped whenever the bundle changes (policy,
//! revocations), and its entries end when the first grant expires; a policy
//! whose conditions read `now` is never memoised.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use wicket_core::{Classification, Command, Decision};

use crate::bundle::Bundle;

/// Entries per session; the memo starts over when it is full.
const ENTRIES: usize = 512;

struct Entry {
    class: Classification,
    text: Option<String>,
    has_reasoning: bool,
    decision: Decision,
    until: DateTime<Utc>,
    counter: Counter,
}

#[derive(Default)]
struct Inner {
    bundle: Option<Arc<Bundle>>,
    entries: HashMap<u64, Vec<Entry>>,
    len: usize,
}

/// Decisions a session already took; see the module docs.
#[derive(Default)]
pub struct DecisionMemo {
    hasher: RandomState,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for DecisionMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DecisionMemo")
    }
}

impl DecisionMemo {
    fn key(&self, command: &Command, reads_text: bool, has_reasoning: bool) -> u64 {
        let c = &command.classification;
        let mut h = self.hasher.build_hasher();
        (
            &c.kind,
            &c.verb,
            &c.objects,
            &c.argv,
            c.risk,
            &c.fingerprint,
        )
            .hash(&mut h);
        has_reasoning.hash(&mut h);
        if reads_text {
            command.text.hash(&mut h);
        }
        h.finish()
    }

    /// The decision taken earlier for this request under `bundle`, and the
    /// metric counter it counts in.
    pub(crate) fn get(
        &self,
        bundle: &Arc<Bundle>,
        command: &Command,
        has_reasoning: bool,
        now: DateTime<Utc>,
    ) -> Option<(Decision, Counter)> {
        let reads_text = bundle.policy.reads_command_text();
        let key = self.key(command, reads_text, has_reasoning);
        let g = self.inner.lock().expect("memo");
        if !g.bundle.as_ref().is_some_and(|b| Arc::ptr_eq(b, bundle)) {
            return None;
        }
        g.entries.get(&key)?.iter().find_map(|e| {
            (e.until > now
                && e.has_reasoning == has_reasoning
                && e.class == command.classification
                && e.text.as_deref().is_none_or(|t| t == command.text))
            .then(|| (e.decision.clone(), e.counter.clone()))
        })
    }

    /// Remembers a decision taken under `bundle` at `now`.
    pub(crate) fn put(
        &self,
        bundle: &Arc<Bundle>,
        command: &Command,
        has_reasoning: bool,
        now: DateTime<Utc>,
        decision: &Decision,
        counter: &Counter,
    ) {
        let Some(until) = bundle.policy.decisions_stable_until(now) else {
            return;
        };
        let reads_text = bundle.policy.reads_command_text();
        let key = self.key(command, reads_text, has_reasoning);
        let mut g = self.inner.lock().expect("memo");
        if !g.bundle.as_ref().is_some_and(|b| Arc::ptr_eq(b, bundle)) || g.len >= ENTRIES {
            g.entries.clear();
            g.len = 0;
            g.bundle = Some(bundle.clone());
        }
        g.len += 1;
        g.entries.entry(key).or_default().push(Entry {
            class: command.classification.clone(),
            text: reads_text.then(|| command.text.clone()),
            has_reasoning,
            decision: decision.clone(),
            until,
            counter: counter.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{Duration, Utc};
    use prometheus_client::metrics::counter::Counter;
    use wicket_core::{Classification, Command, Decision};

    use super::DecisionMemo;
    use crate::bundle::Bundle;

    fn bundle(condition: &str, expires: &str) -> Arc<Bundle> {
        let src = format!(
            "version: 1\nconnections:\n  - name: db\n    protocol: postgres\ngrants:\n  - id: g\n    groups: [agents]\n{expires}rules:\n  - id: r\n    effect: allow\n    match: {{commands: [select]}}\n    condition: {condition}\n"
        );
        Arc::new(Bundle {
            version: 1,
            sha256: String::new(),
            policy: wicket_policy::parse_and_compile(&src, "test").expect("policy"),
            revoked: Default::default(),
            terminated: Default::default(),
            ssh_user_cas: Vec::new(),
        })
    }

    fn command(text: &str, risk: u32) -> Command {
        Command {
            text: text.into(),
            classification: Classification {
                kind: "select".into(),
                risk,
                ..Default::default()
            },
        }
    }

    #[test]
    fn memo_keys_on_what_decides_and_forgets_on_change() {
        let memo = DecisionMemo::default();
        let now = Utc::now();
        let b = bundle("command.risk < 50", "");
        let d = Decision::deny("r", "x");
        let c = Counter::default();
        memo.put(&b, &command("SELECT 1", 5), true, now, &d, &c);
        // Same classification, other text: the policy does not read text.
        assert!(memo.get(&b, &command("SELECT 2", 5), true, now).is_some());
        assert!(memo.get(&b, &command("SELECT 1", 6), true, now).is_none());
        assert!(memo.get(&b, &command("SELECT 1", 5), false, now).is_none());
        // Another bundle (new policy, a revocation): forgotten.
        let b2 = bundle("command.risk < 50", "");
        assert!(memo.get(&b2, &command("SELECT 1", 5), true, now).is_none());

        // A condition reading the text keys on it.
        let t = bundle("\"!command.text.contains('x')\"", "");
        memo.put(&t, &command("SELECT 1", 5), true, now, &d, &c);
        assert!(memo.get(&t, &command("SELECT 1", 5), true, now).is_some());
        assert!(memo.get(&t, &command("SELECT 'x'", 5), true, now).is_none());

        // A condition reading the clock is never memoised.
        let n = bundle("now > timestamp('2020-01-01T00:00:00Z')", "");
        memo.put(&n, &command("SELECT 1", 5), true, now, &d, &c);
        assert!(memo.get(&n, &command("SELECT 1", 5), true, now).is_none());

        // Entries end when a grant expires.
        let exp = (now + Duration::seconds(60)).to_rfc3339();
        let e = bundle("command.risk < 50", &format!("    expires: {exp}\n"));
        memo.put(&e, &command("SELECT 1", 5), true, now, &d, &c);
        assert!(memo.get(&e, &command("SELECT 1", 5), true, now).is_some());
        let later = now + Duration::seconds(61);
        assert!(memo.get(&e, &command("SELECT 1", 5), true, later).is_none());
    }
}
