//! Reasoning carried on a bearer token.
//!
//! kubectl cannot send extra headers, but it runs an exec credential plugin
//! for every invocation, with the caller's environment. So `wicket
//! kube-credential` appends the caller's `WICKET_REASONING` and
//! `TRACEPARENT` to the token it hands kubectl, and the Kubernetes gate
//! takes them off again before it validates the token.

/// The kubectl exec credential plugin may append the caller's reasoning to
/// the token after this marker (`TOKEN~wr.BASE64URL(JSON)`), because kubectl
/// has no way to send extra headers; the gate strips it before validating.
pub const REASONING_MARKER: &str = "~wr.";

/// What rides after [`REASONING_MARKER`].
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CarriedReasoning {
    /// Free-text reasoning.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reasoning: String,
    /// W3C traceparent.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub traceparent: String,
}

impl CarriedReasoning {
    /// `token` with the reasoning appended (unchanged when there is none).
    pub fn attach(&self, token: &str) -> String {
        use base64::Engine as _;
        if self.reasoning.is_empty() && self.traceparent.is_empty() {
            return token.to_string();
        }
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!(
            "{token}{REASONING_MARKER}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        )
    }

    /// Splits a bearer value into the token and what it carries.
    pub fn split(bearer: &str) -> (&str, Option<CarriedReasoning>) {
        use base64::Engine as _;
        match bearer.split_once(REASONING_MARKER) {
            None => (bearer, None),
            Some((token, rest)) => {
                let carried = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(rest)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                (token, carried)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::CarriedReasoning;

    #[test]
    fn reasoning_rides_on_the_token_and_comes_off_again() {
        let c = CarriedReasoning {
            reasoning: "clean up the crashed pod — ticket #42".into(),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        };
        let bearer = c.attach("eyJhbGciOi.payload.sig");
        let (token, back) = CarriedReasoning::split(&bearer);
        assert_eq!(token, "eyJhbGciOi.payload.sig");
        assert_eq!(back, Some(c));
        assert_eq!(CarriedReasoning::default().attach("t"), "t");
        assert_eq!(CarriedReasoning::split("plain"), ("plain", None));
        assert_eq!(CarriedReasoning::split("t~wr.!!!"), ("t", None));
    }
}
