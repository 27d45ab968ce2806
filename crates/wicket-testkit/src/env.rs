//! Real peers started by `cargo xtask test`, found through environment variables.

/// Reads a variable that `cargo xtask test` sets, with a clear message when
/// the test was run another way.
pub fn require(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{var} is not set: this test needs the real peers that `cargo xtask test` starts \
             (run `cargo xtask test`, or `cargo xtask peers` and export what it prints)"
        ),
    }
}

/// URL of the throwaway PostgreSQL server (`postgres://…/postgres`).
pub fn postgres_url() -> String {
    require("WICKET_TEST_PG_URL")
}

/// Issuer URL of the npm `oidc-provider` instance.
pub fn oidc_issuer() -> String {
    require("WICKET_TEST_OIDC_ISSUER")
}

/// A fresh database on the throwaway PostgreSQL server, dropped by nobody:
/// each test gets its own name so tests never share state.
pub fn postgres_database_url(name: &str) -> String {
    let base = postgres_url();
    match base.rfind('/') {
        Some(i) if base[..i].contains("://") && base[i..].len() > 1 => {
            format!("{}/{name}", &base[..i])
        }
        _ => format!("{base}/{name}"),
    }
}

/// Directory with the test PKI `cargo xtask test` made: `ca.pem`, and
/// `server.pem` / `server.key` for `localhost` and `127.0.0.1` (the test
/// PostgreSQL server presents them too).
pub fn tls_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(require("WICKET_TEST_TLS_DIR"))
}
