//! Statement classification with the real PostgreSQL parser (`pg_query`),
//! so the gate and the server can never disagree on what a statement is.

use std::collections::HashMap;
use std::sync::Mutex;

use pg_query::NodeEnum;
use pg_query::protobuf::Token;
use wicket_core::Classification;

/// Functions that read or write server files, run programs or reach other servers.
const DANGEROUS_FUNCTIONS: &[&str] = &[
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_stat_file",
    "lo_import",
    "lo_export",
    "dblink",
    "dblink_exec",
    "dblink_connect",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "set_config",
];

/// One classified statement.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// The statement's own text.
    pub text: String,
    /// Kind, verb, objects, risk, fingerprint.
    pub class: Classification,
    /// Notable properties (`no_where`, `dangerous_function:NAME`, `program`, `multi_statement`).
    pub flags: Vec<String>,
}

fn kind_of(node: &NodeEnum) -> (&'static str, &'static str) {
    use NodeEnum as N;
    match node {
        N::SelectStmt(_) => ("select", "SELECT"),
        N::InsertStmt(_) => ("insert", "INSERT"),
        N::UpdateStmt(_) => ("update", "UPDATE"),
        N::DeleteStmt(_) => ("delete", "DELETE"),
        N::MergeStmt(_) => ("merge", "MERGE"),
        N::CopyStmt(_) => ("copy", "COPY"),
        N::TruncateStmt(_) => ("ddl", "TRUNCATE"),
        N::DropStmt(_) => ("ddl", "DROP"),
        N::CreateStmt(_)
        | N::CreateTableAsStmt(_)
        | N::IndexStmt(_)
        | N::ViewStmt(_)
        | N::CreateSeqStmt(_)
        | N::CreateSchemaStmt(_)
        | N::CreateFunctionStmt(_)
        | N::CreateTrigStmt(_)
        | N::CreateExtensionStmt(_)
        | N::CompositeTypeStmt(_)
        | N::CreateEnumStmt(_)
        | N::CreateDomainStmt(_)
        | N::DefineStmt(_)
        | N::CreatedbStmt(_)
        | N::CreateRoleStmt(_)
        | N::CreatePolicyStmt(_) => ("ddl", "CREATE"),
        N::AlterTableStmt(_)
        | N::AlterSeqStmt(_)
        | N::AlterDomainStmt(_)
        | N::AlterFunctionStmt(_)
        | N::AlterRoleStmt(_)
        | N::AlterOwnerStmt(_)
        | N::AlterObjectSchemaStmt(_)
        | N::AlterEnumStmt(_)
        | N::AlterDatabaseStmt(_)
        | N::AlterSystemStmt(_) => ("ddl", "ALTER"),
        N::RenameStmt(_) => ("ddl", "ALTER"),
        N::DropdbStmt(_) => ("ddl", "DROP"),
        N::DropRoleStmt(_) => ("ddl", "DROP"),
        N::CommentStmt(_) => ("ddl", "COMMENT"),
        N::GrantStmt(_) => ("grant", "GRANT"),
        N::GrantRoleStmt(_) => ("grant", "GRANT"),
        N::AlterDefaultPrivilegesStmt(_) => ("grant", "ALTER DEFAULT PRIVILEGES"),
        N::VariableSetStmt(_) => ("set", "SET"),
        N::VariableShowStmt(_) => ("show", "SHOW"),
        N::TransactionStmt(_) => ("transaction", "TRANSACTION"),
        N::CallStmt(_) => ("call", "CALL"),
        N::DoStmt(_) => ("do", "DO"),
        N::ExplainStmt(_) => ("explain", "EXPLAIN"),
        N::PrepareStmt(_) => ("prepare", "PREPARE"),
        N::ExecuteStmt(_) => ("execute", "EXECUTE"),
        N::DeallocateStmt(_) => ("prepare", "DEALLOCATE"),
        N::ListenStmt(_) => ("listen", "LISTEN"),
        N::UnlistenStmt(_) => ("listen", "UNLISTEN"),
        N::NotifyStmt(_) => ("notify", "NOTIFY"),
        N::DeclareCursorStmt(_) | N::FetchStmt(_) | N::ClosePortalStmt(_) => ("cursor", "CURSOR"),
        N::VacuumStmt(_) => ("maintenance", "VACUUM"),
        N::LockStmt(_) => ("lock", "LOCK"),
        _ => ("utility", "UTILITY"),
    }
}

fn base_risk(kind: &str, verb: &str) -> u32 {
    match (kind, verb) {
        ("select" | "show" | "explain" | "transaction" | "listen", _) => 5,
        ("set" | "prepare" | "execute" | "cursor" | "notify", _) => 10,
        ("insert", _) => 30,
        ("copy", _) => 40,
        ("update" | "merge", _) => 40,
        ("delete", _) => 50,
        ("ddl", "TRUNCATE") => 85,
        ("ddl", "DROP") => 80,
        ("ddl", _) => 60,
        ("grant", _) => 70,
        ("call" | "do", _) => 60,
        ("maintenance" | "lock", _) => 30,
        _ => 40,
    }
}

/// The pg_query fingerprint of a statement (same statement shape, same
/// fingerprint), for "approve this statement for N minutes" and audit.
pub fn fingerprint(text: &str) -> String {
    pg_query::fingerprint(text, 0, 0)
        .map(|f| f.hex)
        .unwrap_or_default()
}

/// Splits and classifies a query string. Anything the parser rejects is an
/// error: unparseable means refused.
pub fn classify(sql: &str) -> Result<Vec<Statement>, String> {
    let parsed = pg_query::parse(sql, 0).map_err(|e| e.to_string())?;
    let stmts = &parsed.protobuf.stmts;
    let multi = stmts.len() > 1;
    let mut out = Vec::with_capacity(stmts.len());
    for raw in stmts {
        let start = raw.stmt_location.max(0) as usize;
        let text = if raw.stmt_len == 0 {
            sql.get(start..).unwrap_or(sql)
        } else {
            sql.get(start..start + raw.stmt_len as usize).unwrap_or(sql)
        }
        .trim()
        .to_string();
        let Some(node) = raw.stmt.as_ref().and_then(|n| n.node.as_ref()) else {
            continue;
        };
        let (mut kind, mut verb) = kind_of(node);
        let mut flags = Vec::new();
        // A statement that carries another one is what it carries: a
        // data-modifying CTE (`WITH d AS (DELETE …) SELECT …`), `EXPLAIN
        // ANALYZE DELETE …` (which runs it), `PREPARE p AS DELETE …`,
        // `COPY (DELETE … RETURNING …) TO …`. The riskiest carried write wins.
        let mut node = node;
        if let NodeEnum::PrepareStmt(p) = node {
            flags.push(format!("prepare:{}", p.name));
            if let Some(inner) = p.query.as_ref().and_then(|q| q.node.as_ref()) {
                node = inner;
                (kind, verb) = kind_of(node);
            }
        }
        if let NodeEnum::ExecuteStmt(x) = node {
            flags.push(format!("execute:{}", x.name));
        }
        let carried = node
            .nodes()
            .into_iter()
            .filter_map(|(n, _, _, _)| match n {
                pg_query::NodeRef::DeleteStmt(d) => {
                    Some((2, "delete", "DELETE", d.where_clause.is_none()))
                }
                pg_query::NodeRef::UpdateStmt(u) => {
                    Some((1, "update", "UPDATE", u.where_clause.is_none()))
                }
                pg_query::NodeRef::MergeStmt(_) => Some((1, "merge", "MERGE", false)),
                pg_query::NodeRef::InsertStmt(_) => Some((0, "insert", "INSERT", false)),
                _ => None,
            })
            .max_by_key(|c| c.0);
        let top_is_write = matches!(kind, "insert" | "update" | "delete" | "merge");
        let mut carried_no_where = false;
        if let Some((_, k, v, no_where)) = carried
            && (!top_is_write || base_risk(k, v) > base_risk(kind, verb))
            && kind != "ddl"
        {
            if (kind, verb) != (k, v) {
                flags.push(format!("carries:{k}"));
            }
            (kind, verb) = (k, v);
            carried_no_where = no_where;
        }
        let mut risk = base_risk(kind, verb);
        if carried_no_where && !matches!(node, NodeEnum::UpdateStmt(_) | NodeEnum::DeleteStmt(_)) {
            flags.push("no_where".to_string());
            risk += 30;
        }
        match node {
            NodeEnum::UpdateStmt(u) if u.where_clause.is_none() => {
                flags.push("no_where".to_string());
                risk += 30;
            }
            NodeEnum::DeleteStmt(d) if d.where_clause.is_none() => {
                flags.push("no_where".to_string());
                risk += 35;
            }
            NodeEnum::CopyStmt(c) if c.is_program => {
                flags.push("program".to_string());
                risk = 95;
            }
            _ => {}
        }
        // Per-statement objects and functions: the whole parse serves a
        // single statement; several need one parse each.
        let own = if multi {
            pg_query::parse(&text, 0).ok()
        } else {
            None
        };
        let (mut objects, functions) = match &own {
            Some(p) => (p.tables(), p.functions()),
            None => (parsed.tables(), parsed.functions()),
        };
        objects.sort();
        objects.dedup();
        for f in functions {
            let short = f.rsplit('.').next().unwrap_or(&f).to_lowercase();
            if DANGEROUS_FUNCTIONS.contains(&short.as_str()) {
                flags.push(format!("dangerous_function:{short}"));
                risk = risk.max(90);
            }
        }
        if multi {
            flags.push("multi_statement".to_string());
            risk += 5;
        }
        out.push(Statement {
            text,
            class: Classification {
                kind: kind.to_string(),
                verb: verb.to_string(),
                objects,
                argv: Vec::new(),
                risk: risk.min(100),
                // Computed on demand (`fingerprint`): it costs another parse.
                fingerprint: String::new(),
            },
            flags,
        });
    }
    Ok(out)
}

/// Statement shapes remembered by a [`Classifier`].
const SHAPES: usize = 4096;
/// Statements longer than this are parsed every time (their keys would cost
/// more memory than the parse costs time).
const MAX_SHAPE_BYTES: usize = 8 * 1024;

/// [`classify`] with a cache by statement shape.
///
/// Applications send the same statements again and again with other
/// constants (`SELECT … WHERE id = 42`, then `= 43`). PostgreSQL's grammar
/// works on tokens, and a constant's value never changes which rule a token
/// sequence reduces by; so two single statements whose tokens are equal but
/// for the values of their constants (and their comments) have the same kind,
/// objects, functions, flags and risk. The key is that token sequence, read
/// with PostgreSQL's own scanner (`pg_query::scan_tokens`, no parse and no
/// protobuf), with each constant reduced to its token type and every other
/// token kept with its exact text. Only the statement text differs between
/// two statements of one shape, and it is taken from the statement itself.
/// Multi-statement queries, statements the scanner rejects and very long
/// statements are always parsed.
#[derive(Default)]
pub struct Classifier {
    shapes: Mutex<HashMap<Vec<u8>, Statement>>,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Classifier")
    }
}

impl Classifier {
    /// Splits and classifies a query string, as [`classify`] does.
    pub fn classify(&self, sql: &str) -> Result<Vec<Statement>, String> {
        let Some((key, text)) = shape(sql) else {
            return classify(sql);
        };
        if let Some(hit) = self.shapes.lock().expect("shapes").get(&key) {
            let mut st = hit.clone();
            st.text = text.to_string();
            return Ok(vec![st]);
        }
        let out = classify(sql)?;
        // Remembered only when the parse agrees on what the statement is.
        if let [st] = out.as_slice()
            && st.text == text
        {
            let mut shapes = self.shapes.lock().expect("shapes");
            if shapes.len() >= SHAPES {
                shapes.clear();
            }
            shapes.insert(key, st.clone());
        }
        Ok(out)
    }

    /// Shapes remembered now.
    pub fn len(&self) -> usize {
        self.shapes.lock().expect("shapes").len()
    }

    /// Whether no shape is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The shape key of a single statement and its text (what [`classify`]
/// would give as the statement's text), or `None` when `sql` is not one
/// statement the cache may serve.
fn shape(sql: &str) -> Option<(Vec<u8>, &str)> {
    if sql.len() > MAX_SHAPE_BYTES {
        return None;
    }
    let tokens = pg_query::scan_tokens(sql).ok()?;
    let mut key = Vec::with_capacity(sql.len() + 4 * tokens.len());
    let mut end = None;
    let mut start = None;
    for t in &tokens {
        let token = Token::try_from(t.token).ok()?;
        if matches!(token, Token::SqlComment | Token::CComment) {
            continue;
        }
        if end.is_some() {
            return None; // something after the `;`: several statements
        }
        if token == Token::Ascii59 {
            end = Some(usize::try_from(t.start).ok()?);
            continue;
        }
        start.get_or_insert(usize::try_from(t.start).ok()?);
        key.extend_from_slice(&t.token.to_le_bytes());
        match token {
            Token::Iconst
            | Token::Fconst
            | Token::Sconst
            | Token::Usconst
            | Token::Bconst
            | Token::Xconst => {}
            _ => {
                let (a, b) = (usize::try_from(t.start).ok()?, usize::try_from(t.end).ok()?);
                key.extend_from_slice(sql.get(a..b)?.as_bytes());
                key.push(0);
            }
        }
    }
    if key.is_empty() {
        return None;
    }
    // The statement starts at its first token (a leading comment is not
    // part of it) and ends at its `;` or at the end of the string.
    Some((key, sql.get(start?..end.unwrap_or(sql.len()))?.trim()))
}

#[cfg(test)]
mod tests {
    use super::classify;

    /// (sql, kind, verb, objects, minimum risk, flag)
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a str,
        &'a [&'a str],
        u32,
        Option<&'a str>,
    );

    #[test]
    fn statements_are_classified() {
        // (sql, kind, verb, objects, min risk, flag)
        let cases: &[Case] = &[
            (
                "SELECT * FROM customers WHERE id = 1",
                "select",
                "SELECT",
                &["customers"],
                5,
                None,
            ),
            ("select 1", "select", "SELECT", &[], 5, None),
            (
                "INSERT INTO public.orders VALUES (1)",
                "insert",
                "INSERT",
                &["public.orders"],
                30,
                None,
            ),
            (
                "UPDATE t SET a = 1",
                "update",
                "UPDATE",
                &["t"],
                70,
                Some("no_where"),
            ),
            (
                "DELETE FROM t WHERE id = 3",
                "delete",
                "DELETE",
                &["t"],
                50,
                None,
            ),
            (
                "DELETE FROM t",
                "delete",
                "DELETE",
                &["t"],
                85,
                Some("no_where"),
            ),
            ("DROP TABLE customers", "ddl", "DROP", &[], 80, None),
            (
                "TRUNCATE customers",
                "ddl",
                "TRUNCATE",
                &["customers"],
                85,
                None,
            ),
            ("CREATE TABLE x (a int)", "ddl", "CREATE", &["x"], 60, None),
            ("GRANT SELECT ON t TO bob", "grant", "GRANT", &[], 70, None),
            (
                "COPY t TO PROGRAM 'curl x'",
                "copy",
                "COPY",
                &["t"],
                95,
                Some("program"),
            ),
            (
                "SELECT pg_read_file('/etc/passwd')",
                "select",
                "SELECT",
                &[],
                90,
                Some("dangerous_function:pg_read_file"),
            ),
            (
                "DO $$ BEGIN RAISE NOTICE 'x'; END $$",
                "do",
                "DO",
                &[],
                60,
                None,
            ),
            ("BEGIN", "transaction", "TRANSACTION", &[], 5, None),
            ("SET wicket.reasoning = 'why'", "set", "SET", &[], 10, None),
            ("EXPLAIN SELECT 1", "explain", "EXPLAIN", &[], 5, None),
        ];
        for (sql, kind, verb, objects, risk, flag) in cases {
            let s = &classify(sql).unwrap()[0];
            assert_eq!(
                (s.class.kind.as_str(), s.class.verb.as_str()),
                (*kind, *verb),
                "{sql}"
            );
            assert!(
                objects
                    .iter()
                    .all(|o| s.class.objects.iter().any(|x| x == o)),
                "{sql}: {:?}",
                s.class.objects
            );
            assert!(s.class.risk >= *risk, "{sql}: risk {}", s.class.risk);
            if let Some(f) = flag {
                assert!(s.flags.iter().any(|x| x == f), "{sql}: {:?}", s.flags);
            }
            assert_eq!(super::fingerprint(sql).len(), 16, "{sql}");
        }
    }

    #[test]
    fn fingerprints_ignore_constants_but_not_extra_statements() {
        let one = super::fingerprint("DELETE FROM orders WHERE id = 1");
        assert_eq!(
            one,
            super::fingerprint("delete from orders where id = 2 /* x */")
        );
        assert_ne!(
            one,
            super::fingerprint("DELETE FROM orders WHERE id = 1; DROP TABLE orders")
        );
        assert_ne!(
            one,
            super::fingerprint("DELETE FROM customers WHERE id = 1")
        );
    }

    #[test]
    fn statements_carried_inside_others_are_what_they_carry() {
        for (sql, kind) in [
            (
                "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d",
                "delete",
            ),
            ("EXPLAIN ANALYZE DELETE FROM t WHERE id = 1", "delete"),
            ("PREPARE p AS DELETE FROM t WHERE id = $1", "delete"),
            ("PREPARE q AS SELECT 1", "select"),
            (
                "COPY (UPDATE t SET a = 1 WHERE id = 2 RETURNING *) TO STDOUT",
                "update",
            ),
            (
                "WITH i AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM i",
                "insert",
            ),
            ("INSERT INTO t SELECT * FROM s", "insert"),
            (
                "WITH d AS (DELETE FROM t RETURNING *) INSERT INTO s SELECT * FROM d",
                "delete",
            ),
            ("SELECT * FROM t", "select"),
        ] {
            let s = &classify(sql).unwrap()[0];
            assert_eq!(s.class.kind, kind, "{sql}: {:?}", s.flags);
        }
        let p = &classify("PREPARE p AS DELETE FROM t").unwrap()[0];
        assert!(
            p.flags.iter().any(|f| f == "prepare:p") && p.flags.iter().any(|f| f == "no_where")
        );
        let x = &classify("EXECUTE p(1)").unwrap()[0];
        assert!(x.flags.iter().any(|f| f == "execute:p"), "{:?}", x.flags);
    }

    #[test]
    fn multi_statement_queries_split_and_garbage_is_refused() {
        let s = classify("SELECT 1; DROP TABLE t; ").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].text, "DROP TABLE t");
        assert!(s[1].flags.iter().any(|f| f == "multi_statement"));
        assert!(classify("SELEC 1").is_err());
        assert!(classify("").unwrap().is_empty());
    }

    #[test]
    fn shapes_serve_statements_that_differ_only_in_constants() {
        let c = super::Classifier::default();
        let a = c
            .classify("SELECT abalance FROM pgbench_accounts WHERE aid = 1")
            .unwrap();
        assert_eq!(c.len(), 1);
        let b = c
            .classify("/* reasoning='x' */ SELECT abalance FROM pgbench_accounts WHERE aid = 99;")
            .unwrap();
        assert_eq!(c.len(), 1, "served from the cache");
        assert_eq!(a[0].class, b[0].class);
        assert_eq!(
            b[0].text,
            "SELECT abalance FROM pgbench_accounts WHERE aid = 99"
        );
        // Same result as a parse, whatever the cache holds.
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 'x'",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1; DROP TABLE t",
            "select abalance FROM pgbench_accounts WHERE aid = 1",
            "SELECT pg_read_file('/etc/passwd')",
            "SELECT pg_read_file('/etc/shadow')",
            "DELETE FROM t WHERE id = 1",
            "DELETE FROM t",
            "COPY t TO PROGRAM 'curl x'",
            "COPY t TO PROGRAM 'wget y';",
            "SET wicket.reasoning = 'why'",
            "SELECT 'a;b'",
            "SELECT 1;;",
            ";",
            "SELECT 1 /* trailing */",
            "SELECT 2 /* trailing */ ; -- after",
            "-- only a comment",
        ] {
            assert_eq!(c.classify(sql), classify(sql), "{sql}");
            assert_eq!(c.classify(sql), classify(sql), "{sql} (cached)");
        }
        // Unparseable stays unparseable.
        assert!(c.classify("SELEC 1").is_err());
        assert!(c.classify("SELECT 'unterminated").is_err());
    }
}
