//! Embedded, ordered migrations per backend, applied once each.

/// `(version, sql)` for SQLite.
pub const SQLITE: &[(i64, &str)] = &[
    (1, include_str!("../migrations/sqlite/0001_init.sql")),
    (2, include_str!("../migrations/sqlite/0002_keys.sql")),
    (
        3,
        include_str!("../migrations/sqlite/0003_approval_reuse.sql"),
    ),
    (
        4,
        include_str!("../migrations/sqlite/0004_access_grants.sql"),
    ),
    (5, include_str!("../migrations/sqlite/0005_audit_chain.sql")),
    (6, include_str!("../migrations/sqlite/0006_export.sql")),
    (7, include_str!("../migrations/sqlite/0007_retention.sql")),
    (
        8,
        include_str!("../migrations/sqlite/0008_console_logouts.sql"),
    ),
];

/// `(version, sql)` for PostgreSQL.
pub const POSTGRES: &[(i64, &str)] = &[
    (1, include_str!("../migrations/postgres/0001_init.sql")),
    (2, include_str!("../migrations/postgres/0002_keys.sql")),
    (
        3,
        include_str!("../migrations/postgres/0003_approval_reuse.sql"),
    ),
    (
        4,
        include_str!("../migrations/postgres/0004_access_grants.sql"),
    ),
    (
        5,
        include_str!("../migrations/postgres/0005_audit_chain.sql"),
    ),
    (6, include_str!("../migrations/postgres/0006_export.sql")),
    (7, include_str!("../migrations/postgres/0007_retention.sql")),
    (
        8,
        include_str!("../migrations/postgres/0008_console_logouts.sql"),
    ),
];

/// Splits a migration into statements (our migrations hold no `;` in literals).
pub fn statements(sql: &str) -> impl Iterator<Item = &str> {
    sql.split(';').map(str::trim).filter(|s| !s.is_empty())
}
