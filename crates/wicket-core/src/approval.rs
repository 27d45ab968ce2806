//! Approvals of held commands.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::types::{Command, Decision, Principal, ReasoningTrace};

/// Lifecycle of an approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalState {
    /// Waiting for approvers.
    Pending,
    /// Quorum reached.
    Approved,
    /// An approver said no.
    Denied,
    /// Nobody decided in time.
    Expired,
}

impl ApprovalState {
    /// Stable lowercase name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Approved => "approved",
            ApprovalState::Denied => "denied",
            ApprovalState::Expired => "expired",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => ApprovalState::Pending,
            "approved" => ApprovalState::Approved,
            "denied" => ApprovalState::Denied,
            "expired" => ApprovalState::Expired,
            _ => return None,
        })
    }

    /// Whether the approval is decided for good.
    pub fn is_final(self) -> bool {
        !matches!(self, ApprovalState::Pending)
    }
}

/// What a sidecar asks approval for.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ApprovalRequest {
    /// Sidecar-minted idempotency key.
    pub request_id: String,
    /// Session of the held command.
    pub session_id: String,
    /// Connection name.
    pub connection: String,
    /// Who wants to run it.
    pub principal: Principal,
    /// The command.
    pub command: Command,
    /// The review decision (rule, approver groups, quorum, timeout).
    pub decision: Decision,
    /// The caller's reasoning.
    #[serde(default)]
    pub reasoning: Option<ReasoningTrace>,
    /// Set on just-in-time access requests: how long the grant lasts once
    /// approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_seconds: Option<u32>,
}

/// One approver's vote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    /// Approver (issuer-qualified subject label).
    pub approver: String,
    /// Subject of the approver, to refuse self-approval.
    pub approver_subject: String,
    /// Issuer of the approver's token.
    pub approver_issuer: String,
    /// Groups of the approver when voting.
    pub approver_groups: Vec<String>,
    /// Yes or no.
    pub approve: bool,
    /// Comment or deny reason.
    pub comment: String,
    /// When.
    pub at: DateTime<Utc>,
    /// For a yes: how long the approver lets the approval cover the same
    /// statement fingerprint (or command) again; 0 for this execution only.
    #[serde(default)]
    pub reuse_seconds: u32,
}

/// A stored approval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// Id.
    pub id: String,
    /// Optimistic-concurrency revision.
    pub rev: i64,
    /// State.
    pub state: ApprovalState,
    /// The request.
    pub request: ApprovalRequest,
    /// Votes so far.
    pub votes: Vec<Vote>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Expires (then refused).
    pub expires_at: DateTime<Utc>,
    /// Deny reason or expiry note.
    pub reason: String,
    /// What a later request must match to be covered by this approval
    /// (connection, principal, rule and fingerprint, hashed by the control
    /// service); empty when the rule allows no reuse.
    #[serde(default)]
    pub reuse_key: String,
    /// Until when the approval covers matching requests (set when it is
    /// approved with a reuse time).
    #[serde(default)]
    pub reuse_until: Option<DateTime<Utc>>,
}

impl Approval {
    /// Records a vote, enforcing: pending and unexpired, nobody approves their
    /// own request, approvers belong to an approver group, one vote per
    /// approver. A no-vote denies at once; yes-votes approve at quorum.
    pub fn cast(&mut self, vote: Vote, now: DateTime<Utc>) -> Result<ApprovalState, String> {
        if self.state == ApprovalState::Pending && now >= self.expires_at {
            self.state = ApprovalState::Expired;
            self.reason = "nobody decided before the hold timeout".into();
        }
        if self.state.is_final() {
            return Err(format!(
                "approval {} is already {}",
                self.id,
                self.state.as_str()
            ));
        }
        let p = &self.request.principal;
        if vote.approver_subject == p.subject && vote.approver_issuer == p.issuer {
            return Err("nobody approves their own request".into());
        }
        let review = self.request.decision.review.clone().unwrap_or_default();
        if !review.approver_groups.is_empty()
            && !vote
                .approver_groups
                .iter()
                .any(|g| review.approver_groups.contains(g))
        {
            return Err(format!(
                "approvers of this request must be in one of: {}",
                review.approver_groups.join(", ")
            ));
        }
        if self.votes.iter().any(|v| {
            v.approver_subject == vote.approver_subject && v.approver_issuer == vote.approver_issuer
        }) {
            return Err("you already voted on this request".into());
        }
        let approve = vote.approve;
        let comment = vote.comment.clone();
        self.votes.push(vote);
        if !approve {
            self.state = ApprovalState::Denied;
            self.reason = if comment.is_empty() {
                "denied".into()
            } else {
                comment
            };
        } else if self.quorum_reached(&review) {
            self.state = ApprovalState::Approved;
            // Every approver agreed to at least the shortest reuse asked,
            // and the rule caps it.
            let reuse = self
                .votes
                .iter()
                .filter(|v| v.approve)
                .map(|v| v.reuse_seconds)
                .min()
                .unwrap_or(0)
                .min(review.reuse_seconds);
            if reuse > 0 && !self.reuse_key.is_empty() {
                self.reuse_until = Some(now + chrono::Duration::seconds(i64::from(reuse)));
            }
        }
        Ok(self.state)
    }

    /// Ends a pending approval whose requester stopped waiting (its client
    /// went away): nobody is left to run the command, so it is no longer
    /// offered to approvers. Recorded as expired with `reason`; false when
    /// it was already decided.
    pub fn withdraw(&mut self, reason: &str) -> bool {
        if self.state == ApprovalState::Pending {
            self.state = ApprovalState::Expired;
            self.reason = reason.into();
            true
        } else {
            false
        }
    }

    /// Expires the approval if its time has passed; returns whether it changed.
    pub fn expire_if_due(&mut self, now: DateTime<Utc>) -> bool {
        if self.state == ApprovalState::Pending && now >= self.expires_at {
            self.state = ApprovalState::Expired;
            self.reason = "nobody decided before the hold timeout".into();
            true
        } else {
            false
        }
    }

    fn quorum_reached(&self, review: &crate::ReviewSpec) -> bool {
        let yes: Vec<&Vote> = self.votes.iter().filter(|v| v.approve).collect();
        if !review.one_per_group {
            return yes.len() as u32 >= review.quorum.max(1);
        }
        // Each group needs its own approver: a matching of groups to distinct voters.
        fn assign(groups: &[String], yes: &[&Vote], used: &mut Vec<bool>) -> bool {
            let Some((g, rest)) = groups.split_first() else {
                return true;
            };
            for (i, v) in yes.iter().enumerate() {
                if !used[i] && v.approver_groups.contains(g) {
                    used[i] = true;
                    if assign(rest, yes, used) {
                        return true;
                    }
                    used[i] = false;
                }
            }
            false
        }
        let mut used = vec![false; yes.len()];
        assign(&review.approver_groups, &yes, &mut used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Effect, ReviewSpec};

    fn approval(one_per_group: bool, quorum: u32) -> Approval {
        Approval {
            id: "a1".into(),
            rev: 0,
            state: ApprovalState::Pending,
            request: ApprovalRequest {
                principal: Principal {
                    subject: "alice".into(),
                    issuer: "iss".into(),
                    ..Default::default()
                },
                decision: Decision {
                    effect: Effect::Review,
                    rule: "r".into(),
                    reason: String::new(),
                    review: Some(ReviewSpec {
                        approver_groups: vec!["dba".into(), "sec".into()],
                        quorum,
                        one_per_group,
                        timeout_seconds: 60,
                        reuse_seconds: 0,
                    }),
                },
                ..Default::default()
            },
            votes: vec![],
            created_at: Utc::now(),
            expires_at: Utc::now() + chrono::Duration::seconds(60),
            reason: String::new(),
            reuse_key: String::new(),
            reuse_until: None,
        }
    }

    fn vote(who: &str, groups: &[&str], approve: bool) -> Vote {
        Vote {
            approver: who.into(),
            approver_subject: who.into(),
            approver_issuer: "iss".into(),
            approver_groups: groups.iter().map(|g| g.to_string()).collect(),
            approve,
            comment: if approve {
                String::new()
            } else {
                "too risky".into()
            },
            at: Utc::now(),
            reuse_seconds: 0,
        }
    }

    #[test]
    fn reuse_is_the_shortest_any_approver_gave_within_the_rule() {
        let now = Utc::now();
        let mut a = approval(false, 2);
        a.reuse_key = "k".into();
        a.request.decision.review.as_mut().unwrap().reuse_seconds = 1800;
        let yes = |who: &str, secs: u32| Vote {
            reuse_seconds: secs,
            ..vote(who, &["dba"], true)
        };
        a.cast(yes("bob", 3600), now).unwrap();
        assert_eq!(a.reuse_until, None, "not approved yet");
        assert_eq!(a.cast(yes("carol", 900), now), Ok(ApprovalState::Approved));
        assert_eq!(a.reuse_until, Some(now + chrono::Duration::seconds(900)));
        // The rule caps it; a rule without reuse (no key) gives none.
        let mut b = approval(false, 1);
        b.reuse_key = "k".into();
        b.request.decision.review.as_mut().unwrap().reuse_seconds = 600;
        b.cast(yes("bob", 3600), now).unwrap();
        assert_eq!(b.reuse_until, Some(now + chrono::Duration::seconds(600)));
        let mut c = approval(false, 1);
        c.cast(yes("bob", 3600), now).unwrap();
        assert_eq!(c.reuse_until, None);
    }

    #[test]
    fn voting_rules() {
        let now = Utc::now();
        let mut a = approval(false, 2);
        assert!(
            a.cast(vote("alice", &["dba"], true), now)
                .unwrap_err()
                .contains("own request")
        );
        assert!(
            a.cast(vote("eve", &["sales"], true), now)
                .unwrap_err()
                .contains("must be in")
        );
        assert_eq!(
            a.cast(vote("bob", &["dba"], true), now),
            Ok(ApprovalState::Pending)
        );
        assert!(
            a.cast(vote("bob", &["dba"], true), now)
                .unwrap_err()
                .contains("already voted")
        );
        assert_eq!(
            a.cast(vote("carol", &["sec"], true), now),
            Ok(ApprovalState::Approved)
        );
        assert!(
            a.cast(vote("dan", &["sec"], false), now)
                .unwrap_err()
                .contains("already approved")
        );

        let mut a = approval(false, 2);
        assert_eq!(
            a.cast(vote("bob", &["dba"], false), now),
            Ok(ApprovalState::Denied)
        );
        assert_eq!(a.reason, "too risky");
    }

    #[test]
    fn one_per_group_needs_distinct_approvers() {
        let now = Utc::now();
        let mut a = approval(true, 2);
        // One person in both groups does not count twice.
        assert_eq!(
            a.cast(vote("bob", &["dba", "sec"], true), now),
            Ok(ApprovalState::Pending)
        );
        assert_eq!(
            a.cast(vote("carol", &["dba"], true), now),
            Ok(ApprovalState::Approved)
        );
    }

    #[test]
    fn expiry() {
        let mut a = approval(false, 1);
        let later = a.expires_at + chrono::Duration::seconds(1);
        assert!(
            a.cast(vote("bob", &["dba"], true), later)
                .unwrap_err()
                .contains("expired")
        );
        assert_eq!(a.state, ApprovalState::Expired);
        assert!(!a.expire_if_due(later));
    }
}
