//! Token validation against the in-process IdP.

use std::time::Duration;

use wicket_core::PrincipalKind;
use wicket_identity::{AuthError, Config, Validator};
use wicket_testkit::idp::{TestIdp, TokenSpec};

async fn setup() -> (TestIdp, Validator) {
    wicket_testkit::init_crypto();
    let idp = TestIdp::start("wicket").await;
    let mut cfg = Config::new(idp.issuer(), "wicket");
    cfg.jwks_min_refresh = Duration::from_millis(300);
    let v = Validator::discover(cfg).await.expect("discover");
    (idp, v)
}

#[tokio::test]
async fn good_tokens_become_principals() {
    let (idp, v) = setup().await;
    let id = v
        .validate(&idp.mint(&TokenSpec::human("alice", &["dba", "wicket-admins"])))
        .await
        .unwrap();
    assert_eq!(id.principal.subject, "alice");
    assert_eq!(id.principal.issuer, idp.issuer());
    assert_eq!(id.principal.kind, PrincipalKind::Human);
    assert_eq!(id.principal.groups, ["dba", "wicket-admins"]);
    assert_eq!(id.principal.display_name, "alice@example.test");
    assert!(id.expires_at > chrono::Utc::now());

    let agent = v
        .validate(&idp.mint(&TokenSpec::agent("bot-1", &[])))
        .await
        .unwrap();
    assert_eq!(agent.principal.kind, PrincipalKind::Agent);
    // client-credentials shape alone (sub == client_id) also marks an agent
    let mut spec = TokenSpec::agent("bot-2", &[]);
    spec.agent = false;
    let agent = v.validate(&idp.mint(&spec)).await.unwrap();
    assert_eq!(agent.principal.kind, PrincipalKind::Agent);
}

#[tokio::test]
async fn bad_tokens_are_refused_with_the_right_reason() {
    let (idp, v) = setup().await;
    let ok = TokenSpec::human("alice", &[]);
    let expired = TokenSpec {
        ttl_seconds: -120,
        ..ok.clone()
    };
    let future = TokenSpec {
        nbf_offset_seconds: 600,
        ..ok.clone()
    };
    let wrong_aud = TokenSpec {
        audience: Some("someone-else".into()),
        ..ok.clone()
    };
    let cases: Vec<(String, AuthError)> = vec![
        (String::new(), AuthError::Missing),
        ("not-a-jwt".into(), AuthError::Malformed),
        ("a.b.c".into(), AuthError::Malformed),
        (idp.mint_alg_none(&ok), AuthError::Algorithm),
        (idp.mint(&expired), AuthError::Expired),
        (idp.mint(&future), AuthError::NotYetValid),
        (idp.mint(&wrong_aud), AuthError::Audience),
        (idp.mint_with_foreign_key(&ok), AuthError::Signature),
        ("x".repeat(20_000), AuthError::Malformed),
    ];
    for (i, (token, want)) in cases.into_iter().enumerate() {
        assert_eq!(v.validate(&token).await.unwrap_err(), want, "case {i}");
    }
    // A token from another issuer with the same kid is refused.
    let other = TestIdp::start("wicket").await;
    let err = v.validate(&other.mint(&ok)).await.unwrap_err();
    assert!(
        matches!(err, AuthError::Signature | AuthError::Issuer),
        "{err:?}"
    );
}

#[tokio::test]
async fn hmac_tokens_signed_with_public_material_are_refused() {
    let (idp, v) = setup().await;
    // The classic confusion attack: HS256 keyed with something public.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("k1".into());
    let claims = serde_json::json!({"iss": idp.issuer(), "sub": "mallory", "aud": "wicket",
        "exp": chrono::Utc::now().timestamp() + 600});
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"public"),
    )
    .unwrap();
    assert_eq!(v.validate(&token).await.unwrap_err(), AuthError::Algorithm);
}

#[tokio::test]
async fn key_rotation_is_picked_up_and_refetches_are_rate_limited() {
    let (idp, v) = setup().await;
    let before = idp.jwks_fetches();
    idp.rotate_key(true);
    // Unknown kid: one refetch, then success.
    let id = v.validate(&idp.mint(&TokenSpec::human("alice", &[]))).await;
    assert!(id.is_ok(), "{id:?}");
    assert_eq!(idp.jwks_fetches(), before + 1);
    // A flood of tokens with unknown kids triggers at most one more fetch.
    idp.rotate_key(false);
    let hidden = idp.mint(&TokenSpec::human("alice", &[]));
    idp.rotate_key(true); // retire it again before anyone fetched
    tokio::time::sleep(Duration::from_millis(350)).await;
    let mut unknown = 0;
    for _ in 0..50 {
        if v.validate(&hidden).await == Err(AuthError::UnknownKey) {
            unknown += 1;
        }
    }
    assert_eq!(unknown, 50);
    assert_eq!(
        idp.jwks_fetches(),
        before + 2,
        "refetches must be rate-limited"
    );
}

#[tokio::test]
async fn discovery_refuses_a_mismatched_issuer() {
    wicket_testkit::init_crypto();
    let idp = TestIdp::start("wicket").await;
    let cfg = Config::new(format!("{}/", idp.issuer()), "wicket");
    let err = Validator::discover(cfg).await.unwrap_err();
    assert!(matches!(err, AuthError::Unavailable(m) if m.contains("names issuer")));
    let cfg = Config::new("http://127.0.0.1:1", "wicket");
    assert!(matches!(
        Validator::discover(cfg).await.unwrap_err(),
        AuthError::Unavailable(_)
    ));
}
