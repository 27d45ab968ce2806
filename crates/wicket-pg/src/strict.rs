//! Strict masking: statements whose results would carry a masked column
//! other than as the column itself are refused.
//!
//! Masking recognises a masked column by the table and attribute the server
//! names in its row description, which it does only for a plain column.
//! Anything else (`upper(ssn)`, `ssn || ''`, `row_to_json(p)`, `p.*` inside
//! an expression, `(SELECT ssn …)`, a CTE or subquery that selects it, a
//! `UNION`, an aggregate, a set-returning function over it) comes back as a
//! computed column that only the content detectors see. In strict mode the
//! gate reads the parse tree and refuses such statements, naming the column.
//!
//! It judges names: an unqualified column counts as masked when any table
//! in scope has a masked column of that name, and a relation alias used as
//! a value (a whole row) when its table has any. Views are seen through: the
//! gate reads each relation's definition from the catalog
//! ([`analyze`]; four views deep), and a view that selects a masked
//! column in any form is refused, since through a view even the plain
//! column loses its table.

use pg_query::NodeEnum;
use pg_query::protobuf::{self, Node};

use crate::mask::Plan;

/// A relation in a FROM list.
struct Rel {
    schema: String,
    name: String,
    alias: String,
}

/// The masked column `sql` would leak, if any (`schema.table.column`).
pub fn leak(plan: &Plan, sql: &str) -> Option<String> {
    analyze(plan, sql, true).0
}

/// One parse of `sql`: the masked column it would leak, if any, and every
/// relation it names (`(schema or "", name)`), for the views among them to
/// be looked at too. `top`: `sql` is what the client sent (its plain
/// columns are masked on the way out); else it is a view's definition
/// (`pg_get_viewdef`), through which even the plain column loses its table.
pub fn analyze(plan: &Plan, sql: &str, top: bool) -> (Option<String>, Vec<(String, String)>) {
    if !plan.has_columns() {
        return (None, Vec::new());
    }
    let Ok(parsed) = pg_query::parse(sql, 0) else {
        return (None, Vec::new());
    };
    let leak = parsed
        .protobuf
        .stmts
        .iter()
        .filter_map(|s| s.stmt.as_ref()?.node.as_ref())
        .find_map(|n| stmt(plan, n, top));
    let mut relations: Vec<(String, String)> = Vec::new();
    if leak.is_none() {
        for (n, _, _, _) in parsed.protobuf.nodes() {
            if let pg_query::NodeRef::RangeVar(r) = n {
                let key = (r.schemaname.clone(), r.relname.clone());
                if !relations.contains(&key) {
                    relations.push(key);
                }
            }
        }
    }
    (leak, relations)
}

fn stmt(plan: &Plan, n: &NodeEnum, top: bool) -> Option<String> {
    match n {
        NodeEnum::SelectStmt(s) => select(plan, s, top),
        NodeEnum::ExplainStmt(e) => stmt(plan, e.query.as_ref()?.node.as_ref()?, top),
        NodeEnum::DeclareCursorStmt(d) => stmt(plan, d.query.as_ref()?.node.as_ref()?, top),
        NodeEnum::CreateTableAsStmt(c) => stmt(plan, c.query.as_ref()?.node.as_ref()?, false),
        NodeEnum::CopyStmt(c) => stmt(plan, c.query.as_ref()?.node.as_ref()?, false),
        NodeEnum::PrepareStmt(p) => stmt(plan, p.query.as_ref()?.node.as_ref()?, top),
        NodeEnum::InsertStmt(i) => {
            // INSERT … SELECT masked: the copy would hold the original.
            stmt(plan, i.select_stmt.as_ref()?.node.as_ref()?, false)
        }
        _ => None,
    }
}

fn select(plan: &Plan, s: &protobuf::SelectStmt, top: bool) -> Option<String> {
    // A set operation's columns come from no table.
    if let (Some(l), Some(r)) = (&s.larg, &s.rarg) {
        return select(plan, l, false).or_else(|| select(plan, r, false));
    }
    if let Some(w) = &s.with_clause {
        for cte in &w.ctes {
            if let Some(NodeEnum::CommonTableExpr(c)) = cte.node.as_ref()
                && let Some(q) = c.ctequery.as_ref().and_then(|q| q.node.as_ref())
                && let Some(l) = stmt(plan, q, false)
            {
                return Some(l);
            }
        }
    }
    let mut scope = Vec::new();
    for f in &s.from_clause {
        if let Some(l) = from_item(plan, f, &mut scope) {
            return Some(l);
        }
    }
    for t in &s.target_list {
        let Some(NodeEnum::ResTarget(rt)) = t.node.as_ref() else {
            continue;
        };
        let Some(val) = rt.val.as_ref().and_then(|v| v.node.as_ref()) else {
            continue;
        };
        if let NodeEnum::ColumnRef(c) = val
            && top
        {
            // The column itself (masked on the way out), or `*` / `t.*`.
            if let Some(l) = whole_row_value(plan, c, &scope) {
                return Some(l);
            }
            continue;
        }
        if let Some(l) = expression(plan, val, &scope) {
            return Some(l);
        }
    }
    None
}

/// Adds a FROM item's relations to `scope`; a leak inside it (a subquery,
/// a function over a masked column) is returned.
fn from_item(plan: &Plan, n: &Node, scope: &mut Vec<Rel>) -> Option<String> {
    match n.node.as_ref()? {
        NodeEnum::RangeVar(r) => {
            scope.push(Rel {
                schema: if r.schemaname.is_empty() {
                    "public".into()
                } else {
                    r.schemaname.clone()
                },
                name: r.relname.clone(),
                alias: r
                    .alias
                    .as_ref()
                    .map(|a| a.aliasname.clone())
                    .unwrap_or_default(),
            });
            None
        }
        NodeEnum::JoinExpr(j) => {
            let l = j.larg.as_deref().and_then(|x| from_item(plan, x, scope));
            l.or_else(|| j.rarg.as_deref().and_then(|x| from_item(plan, x, scope)))
        }
        NodeEnum::RangeSubselect(r) => stmt(plan, r.subquery.as_ref()?.node.as_ref()?, false),
        NodeEnum::RangeFunction(f) => f
            .functions
            .iter()
            .find_map(|x| x.node.as_ref().and_then(|n| expression(plan, n, scope))),
        _ => None,
    }
}

/// A masked column or a masked table's whole row anywhere in `e`.
fn expression(plan: &Plan, e: &NodeEnum, scope: &[Rel]) -> Option<String> {
    for (r, _, _, _) in e.nodes() {
        match r {
            pg_query::NodeRef::ColumnRef(c) => {
                if let Some(l) = column(plan, c, scope).or_else(|| whole_row_value(plan, c, scope))
                {
                    return Some(l);
                }
            }
            pg_query::NodeRef::SelectStmt(s) => {
                if let Some(l) = select(plan, s, false) {
                    return Some(l);
                }
            }
            _ => {}
        }
    }
    None
}

fn names(c: &protobuf::ColumnRef) -> (Vec<String>, bool) {
    let mut out = Vec::new();
    let mut star = false;
    for f in &c.fields {
        match f.node.as_ref() {
            Some(NodeEnum::String(s)) => out.push(s.sval.clone()),
            Some(NodeEnum::AStar(_)) => star = true,
            _ => {}
        }
    }
    (out, star)
}

fn rel_named<'a>(scope: &'a [Rel], q: &str) -> impl Iterator<Item = &'a Rel> {
    scope
        .iter()
        .filter(move |r| r.alias == q || (r.alias.is_empty() && r.name == q))
}

/// The masked column a column reference names, if it names one.
fn column(plan: &Plan, c: &protobuf::ColumnRef, scope: &[Rel]) -> Option<String> {
    let (n, star) = names(c);
    let hit = |r: &Rel, col: &str| {
        plan.masks(&r.schema, &r.name, col)
            .then(|| format!("{}.{}.{col}", r.schema, r.name))
    };
    match (n.as_slice(), star) {
        ([col], false) => scope.iter().find_map(|r| hit(r, col)),
        ([q, col], false) => rel_named(scope, q).find_map(|r| hit(r, col)),
        ([s, t, col], false) => plan.masks(s, t, col).then(|| format!("{s}.{t}.{col}")),
        // `*` or `t.*` inside an expression: every column, masked ones included.
        (_, true) => whole(plan, n.first().map(String::as_str), scope),
        _ => None,
    }
}

/// A whole row used as a value: `p` naming a relation, or `p.*` / `*`
/// inside an expression. At the top level `*` and `p.*` expand to the
/// columns themselves and are fine; `p` alone is a record.
fn whole_row_value(plan: &Plan, c: &protobuf::ColumnRef, scope: &[Rel]) -> Option<String> {
    let (n, star) = names(c);
    if star {
        return None;
    }
    match n.as_slice() {
        [q] if rel_named(scope, q).next().is_some() => whole(plan, Some(q), scope),
        _ => None,
    }
}

fn whole(plan: &Plan, q: Option<&str>, scope: &[Rel]) -> Option<String> {
    scope
        .iter()
        .filter(|r| q.is_none_or(|q| r.alias == q || (r.alias.is_empty() && r.name == q)))
        .find_map(|r| {
            plan.masked_column_of(&r.schema, &r.name)
                .map(|col| format!("{}.{}.{col}", r.schema, r.name))
        })
}

#[cfg(test)]
mod tests {
    use super::leak;
    use crate::mask::Plan;

    #[test]
    fn derivations_of_masked_columns_are_found() {
        let policy = wicket_policy::parse_and_compile(
            "version: 1\nconnections:\n  - name: db\n    protocol: postgres\n    masking:\n      strict: true\n      columns: [{column: public.people.ssn}]\n",
            "t",
        )
        .unwrap();
        let plan = Plan::compile(&policy, "db", b"k").unwrap().unwrap();
        for sql in [
            "SELECT upper(ssn) FROM people",
            "SELECT ssn || '' FROM people",
            "SELECT p.ssn::text || 'x' FROM people p",
            "SELECT row_to_json(p) FROM people p",
            "SELECT p FROM people p",
            "SELECT to_jsonb(p.*) FROM people p",
            "SELECT (SELECT ssn FROM people LIMIT 1)",
            "SELECT x FROM (SELECT ssn AS x FROM people) s",
            "WITH c AS (SELECT ssn FROM people) SELECT * FROM c",
            "SELECT ssn FROM people UNION SELECT 'a'",
            "SELECT string_agg(ssn, ',') FROM people",
            "SELECT * FROM unnest(ARRAY(SELECT ssn FROM people))",
            "SELECT public.people.ssn || '' FROM public.people",
            "EXPLAIN ANALYZE SELECT md5(ssn) FROM people",
            "CREATE TABLE copy AS SELECT ssn FROM people",
            "INSERT INTO other SELECT ssn FROM people",
            "COPY (SELECT ssn FROM people) TO STDOUT",
        ] {
            assert_eq!(
                leak(&plan, sql).as_deref(),
                Some("public.people.ssn"),
                "{sql}"
            );
        }
        for sql in [
            "SELECT ssn FROM people",
            "SELECT ssn AS x, name FROM people WHERE id = 1",
            "SELECT * FROM people",
            "SELECT p.* FROM people p",
            "SELECT upper(name) FROM people",
            "SELECT upper(ssn) FROM others",
            "SELECT count(*) FROM people",
        ] {
            assert_eq!(leak(&plan, sql), None, "{sql}");
        }
    }
}
